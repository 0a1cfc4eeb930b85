-- dmarc: the From domain's DMARC policy (RFC 7489), honoured (stock pack).
--
-- At eom, for clients that are not internal, authenticated or trusted: milter.dmarc.check with
-- the SPF result of the spf policy (ctx.msg.spf) and the DKIM results of the dkim policy
-- (ctx.msg.dkim; verified here when the dkim policy did not run). Publishes ctx.msg.dmarc.
--   * p=reject: refused (550 5.7.1), p=quarantine: the message is quarantined (held by the MTA),
--     unless an override applies: a client in `trusted_forwarders`, a List-Id in
--     `mailing_lists`, or an ARC chain that passed while `arc_override` is on; a message outside
--     the record's pct= sample gets the next lower policy (dmarc.check lowers r.policy);
--   * `report_only`: nothing is enforced, the disposition is only logged;
--   * every evaluated message logs one `dmarc-report` line with the fields of a DMARC aggregate
--     report record (RFC 7489 appendix C), for a report generator: at debug, or at info with
--     `report_log` (so that info keeps one line per message unless reports are wanted).
-- Every default and reply is documented in docs/policies/dmarc.md.
local milter = require "milter"
local dmarc = require "milter.dmarc"

-- Whether `name` is `domain` or a subdomain of it.
local function within(name, domain)
  name, domain = name:lower(), domain:lower()
  return name == domain or name:sub(-#domain - 1) == "." .. domain
end

-- The override that applies to this message, if any (aggregate report reason types).
local function override(ctx, opts)
  local host = ctx.client.hostname or ""
  for _, forwarder in ipairs(opts.trusted_forwarders) do
    if forwarder == ctx.client.ip or within(host, forwarder) then return "trusted_forwarder" end
  end
  local list = ctx:header("List-Id")
  local list_id = list and (list:match("<([^>]+)>") or list)
  for _, name in ipairs(opts.mailing_lists) do
    if list_id and within(list_id, name) then return "mailing_list" end
  end
  if opts.arc_override and ctx.msg.arc and ctx.msg.arc.result == "pass" then
    return "local_policy"
  end
end

-- The aggregate-report data line: one record of RFC 7489 appendix C.
local function report(ctx, r, disposition, reason, opts)
  local dkim_domains = {}
  for _, sig in ipairs(ctx.msg.dkim or {}) do
    dkim_domains[#dkim_domains + 1] = sig.domain .. "=" .. sig.result
  end
  local spf = ctx.msg.spf
  local log = opts.report_log and milter.log.info or milter.log.debug
  log(string.format(
    "dmarc-report: source_ip=%s header_from=%s policy_domain=%s p=%s pct=%d disposition=%s "
      .. "dmarc=%s dkim_aligned=%s spf_aligned=%s dkim=%s spf=%s spf_domain=%s reason=%s rua=%s",
    tostring(ctx.client.ip), r.domain, tostring(r.record_domain), r.published, r.pct, disposition,
    r.result, tostring(r.alignment.dkim), tostring(r.alignment.spf),
    #dkim_domains > 0 and table.concat(dkim_domains, ",") or "none",
    spf and spf.official or "none", spf and spf.domain or "-", reason or "-",
    #r.rua > 0 and table.concat(r.rua, ",") or "-"))
end

return {
  description = "evaluate DMARC and honour p=reject and p=quarantine, with overrides and an aggregate-report log",
  options = {
    report_only = false,
    report_log = false,
    trusted_forwarders = {},
    mailing_lists = {},
    arc_override = false,
    reject_reply = "DMARC policy of {domain} rejects this message",
    quarantine_reason = "DMARC policy of {domain}: quarantine",
  },

  eom = function(ctx, opts)
    local client = ctx.client
    if client.internal or client.authenticated or client.trusted or client.localhost then
      return
    end
    local r = dmarc.check(ctx)
    ctx.msg.dmarc = r
    if r.result == "none" and r.domain == "" then return end
    local disposition, reason = "none", nil
    if r.result == "fail" and r.policy ~= "none" then
      reason = override(ctx, opts)
      if not reason then disposition = r.policy end
    end
    if not reason and not r.sampled then reason = "sampled_out" end
    if r.result ~= "none" then report(ctx, r, disposition, reason, opts) end
    if opts.report_only or disposition == "none" then return end
    local values = { domain = r.domain }
    if disposition == "reject" then
      return milter.reject{ code = 550, xcode = "5.7.1", text = milter.fill(opts.reject_reply, values) }
    end
    ctx:quarantine(milter.fill(opts.quarantine_reason, values))
  end,
}
