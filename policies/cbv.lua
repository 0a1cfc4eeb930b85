-- cbv: call-back verification of the sender, the classic milter's CBV (stock pack).
--
-- EOM (put `cbv` last in the chain, so it runs after every other check): when an earlier
-- policy queued a call-back (`ctx.msg.cbv = "CBV"` or `"DSN"`: the spf policy does it for the
-- access values CBV and DSN and for three strikes), asks the sender's mail exchanger whether
-- it takes mail for the sender (milter.smtp.verify) and answers:
--   accepted → continue; 4xx → 450 4.2.0 "CBV: <code> <text>"; 5xx → 550 5.7.1 `refused_reply`
--   after the errors_url page `dsnrefused` (lib/replies) (the refusal is remembered); no
--   answer → 450 4.2.0 "CBV: 450 <why>" (`error_action`).
-- Skipped for the null sender, internal, authenticated, trusted and localhost clients, sender
-- domains in [site] internal_domains ("Fraudulent MX": we would call ourselves), and
-- whitelisted senders (ctx.msg.listed) unless SPF said softfail or permerror.
-- MAIL: a sender whose call-back was refused permanently (remembered by milter.smtp) is
-- blacklisted: demerits and 550 5.7.1 `blacklist_reply` (held until DATA with delay_reject).
-- DSN (`ctx.msg.cbv = "DSN"`): the sender is sent a warning DSN from the template named by
-- ctx.msg.cbv_template (templates/<name>.txt, lib/notice) through the relay, when a recipient's
-- NOTIFY has DELAY, at most `dsn_rate` per domain per `dsn_window` and once per sender per
-- `dsn_remember`; otherwise (no template, NOTIFY, rate) a plain call-back is done. A relay that
-- refuses the DSN is answered like a call-back that refuses.
-- Log lines start with the classic tags `CBV:` and `DSN:`. See docs/policies/cbv.md.
local milter = require "milter"
local smtp = require "milter.smtp"
local site = require "milter.site"
local notice = require "lib.notice"
local replies = require "lib.replies"

-- Why there was no SMTP answer, as the classic transport said it (with a 450 code).
local NO_ANSWER = {
  nomx = "No MX servers available for {domain}",
  dns = "DNS Timeout: {domain} MX",
  timeout = "No MX response in time for {domain}",
  refused = "No MX servers available for {domain}",
  closed = "No MX servers available for {domain}",
  tls = "No MX servers available for {domain}",
  limited = "Too many call-backs to {domain}, try again later",
}

-- Reply text: control characters made spaces, cut to what SMTP allows.
local function clean(text)
  return (tostring(text):gsub("%c", " "):sub(1, 900))
end

local function lines(template, values)
  local out = {}
  for i, text in ipairs(milter.fill(template, values)) do out[i] = clean(text) end
  return out
end

-- Clients whose senders are not called back.
local function exempt(client)
  return client.internal or client.authenticated or client.trusted or client.localhost
end

local function whitelisted(ctx)
  return ctx.msg.listed == "WHITELIST" or ctx.msg.listed == "PROBATION"
end

-- The call-back's deadline.
local function timeout(opts)
  return opts.timeout > 0 and opts.timeout or nil
end

-- The answer at eom to what the sender's side said (`result, err` as milter.smtp.verify gives
-- them; a DSN the relay refused gives its reply): the result table of docs/policies/cbv.md.
local function answer(ctx, target, result, err, values, opts)
  if result == "ok" then
    ctx.msg.cbv_result = "ok"
    milter.log.debug("CBV: " .. target .. " ok")
    return
  end
  local code, text
  if result then
    code, text = result.code, clean(result.text)
  elseif err == "invalid" then
    milter.log.debug("CBV: " .. target .. " skipped: not an address")
    return
  else
    code, text = 450, milter.fill(NO_ANSWER[err] or err, values)
  end
  local desc = "CBV: " .. code .. " " .. text
  if result and result.permanent then
    ctx.msg.cbv_result = "refused"
    milter.log.debug(desc .. " (" .. target .. "): REJECT")
    values.code, values.text = code, text
    return milter.reject{ code = 550, xcode = "5.7.1", text = replies.lines("dsnrefused",
      { { "mfrom", target }, { "msg", code .. " " .. text } }, lines(opts.refused_reply, values)) }
  end
  ctx.msg.cbv_result = result and "temporary" or err
  if not result and opts.error_action == "continue" then
    milter.log.debug(desc .. " (" .. target .. "): continue")
    return
  end
  milter.log.debug(desc .. " (" .. target .. "): TEMPFAIL")
  return milter.tempfail{ code = 450, xcode = "4.2.0", text = desc }
end

return {
  description = "call-back verification of the sender at end of message (access values CBV and DSN, three strikes); refuses senders whose call-back failed",
  options = {
    timeout = 0,
    error_action = "tempfail",
    refused_reply = { "CBV: {code} {text}" },
    blacklist_cached = true,
    blacklist_demerits = 2,
    blacklist_reply = { "CBV: {code} {text}" },
    strike3_demerits = 2,
    dsn_rate = 10,
    dsn_window = "1h",
    dsn_remember = "7d",
  },

  mail = function(ctx, sender, args, opts)
    if ctx.msg.cbv_template == "strike3" and ctx.demerits < opts.strike3_demerits then
      -- Three strikes: a later bad recipient then bans the client (the classic offense count).
      ctx:demerit(opts.strike3_demerits - ctx.demerits, "cbv: three strikes")
    end
    if not opts.blacklist_cached or ctx.sender == "" or exempt(ctx.client) or whitelisted(ctx) then
      return
    end
    local result = smtp.cached(ctx.sender)
    if type(result) ~= "table" or not result.permanent then return end
    ctx.msg.listed = "BLACKLIST"
    milter.log.debug("CBV: blacklisted " .. ctx.sender .. ": " .. result.code .. " " .. result.text)
    if opts.blacklist_demerits > 0 then
      ctx:demerit(opts.blacklist_demerits, "cbv: call-back of " .. ctx.sender .. " failed")
    end
    return milter.reject{ code = 550, xcode = "5.7.1",
      text = lines(opts.blacklist_reply, { code = result.code, text = result.text, sender = ctx.sender }) }
  end,

  eom = function(ctx, opts)
    local need = ctx.msg.cbv
    if need == nil then return end
    if need ~= "CBV" and need ~= "DSN" then
      milter.log.warn("CBV: ignoring ctx.msg.cbv = " .. tostring(need) .. " (CBV or DSN)")
      return
    end
    local sender = ctx.sender or ""
    if sender == "" or exempt(ctx.client) then return end
    local spf = ctx.msg.spf
    local effective = type(spf) == "table" and spf.effective or nil
    if whitelisted(ctx) and effective ~= "softfail" and effective ~= "permerror" then
      milter.log.debug("CBV: " .. sender .. " skipped: " .. ctx.msg.listed)
      return
    end
    local target = ctx.msg.cbv_target or sender
    local domain = target:match("@([^@]+)$") or ""
    local sender_domain = sender:match("@([^@]+)$") or ""
    if site.internal_domain(sender_domain) or site.internal_domain(domain) then
      milter.log.debug("CBV: " .. target .. " skipped: internal domain (Fraudulent MX)")
      return
    end
    local template = ctx.msg.cbv_template
    local values = { domain = domain, sender = target }
    if need == "DSN" then
      local remembered = smtp.cached(target)
      if remembered == "ok" then
        ctx.msg.cbv_result = "ok"
        milter.log.debug("DSN: " .. target .. " ok (remembered)")
        return
      end
      local sent, err, reply = nil, "notemplate", nil
      if template then
        sent, err, reply = notice.send(ctx, template, { target = target,
          dsn_rate = opts.dsn_rate, dsn_window = opts.dsn_window,
          dsn_remember = opts.dsn_remember, timeout = timeout(opts) })
      end
      ctx.msg.dsn = { template = template, target = target, sent = sent == true,
        error = err }
      if sent then
        ctx.msg.cbv_result = "ok"
        milter.log.info("DSN: sent " .. template .. " to " .. target)
        return
      elseif err == "remembered" then
        ctx.msg.cbv_result = "ok"
        milter.log.debug("DSN: " .. target .. " was sent " .. template .. " lately")
        return
      elseif err == "rejected" then
        milter.log.debug("DSN: " .. template .. " to " .. target .. " rejected by the relay")
        return answer(ctx, target, reply, nil, values, opts)
      end
      milter.log.debug("DSN: not sending " .. tostring(template) .. " to " .. target .. ": "
        .. err .. " (a plain call-back instead)")
    end
    local result, err = smtp.verify(target, { timeout = timeout(opts) })
    return answer(ctx, target, result, err, values, opts)
  end,
}
