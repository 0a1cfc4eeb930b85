-- authres: one Authentication-Results header (RFC 8601) for the results the other policies
-- computed (stock pack). List it after spf, dkim and dmarc.
--
-- At eom, for each message:
--   1. every Authentication-Results header of the message whose authserv-id is ours is deleted:
--      nobody upstream may speak for us (RFC 8601 §5); headers of other authserv-ids are kept;
--   2. one header is inserted at the top, authserv-id `authserv_id` (default ctx.receiver), with
--      the results present: auth= (SMTP AUTH), spf= (ctx.msg.spf), iprev= (clients that are
--      not internal, authenticated, trusted or localhost), dkim= (ctx.msg.dkim, one per
--      signature, or dkim=none), dmarc= (ctx.msg.dmarc), arc= (ctx.msg.arc). With none of them
--      present, no header is added;
--   3. with `arc_seal` set (a domain with a `[dkim.keys]` entry; off when empty), the message is
--      ARC-sealed (RFC 8617) with that key: ARC-Seal, ARC-Message-Signature and
--      ARC-Authentication-Results (the same results) at the top, cv= from the chain it has.
--      milter.dkim is required by setup only then: sealing reads the body, so only then does
--      the MTA send it. A domain without a key is a load error.
-- Every default is documented in docs/policies/authres.md.
local dns = require "milter.dns"
local milter = require "milter"
-- milter.dkim when arc_seal is set (see setup).
local dkim

-- An RFC 8601 property value: as is when it is a token or a plain mailbox, else quoted.
local function pvalue(text)
  local atom = "[%w!#$%%&'*+./=?^_`{|}~-]"
  if text:match("^" .. atom .. "+$") or text:match("^" .. atom .. "*@[%w.-]+$") then
    return text
  end
  return '"' .. text:gsub('[\\"]', "\\%0") .. '"'
end

-- An RFC 8601 comment: parentheses and backslashes escaped, control characters made spaces.
local function comment(text)
  return "(" .. text:gsub("%c", " "):gsub("[()\\]", "\\%0") .. ")"
end

-- The iprev result (RFC 8601 §2.7.3) and the confirmed name, from forward-confirmed rDNS.
local function iprev(ip)
  local names, err = dns.fcrdns(ip)
  if names and #names > 0 then return "pass", names[1] end
  if names then return "fail" end
  if err == "nxdomain" or err == "nodata" then return "permerror" end
  return "temperror"
end

-- The authserv-id of an Authentication-Results value: its first token, before any version,
-- comment or ";".
local function authserv_id(value)
  return (value:match("^%s*([^%s;(]+)") or ""):lower()
end

local function parts(ctx, opts)
  local out = {}
  local client, msg = ctx.client, ctx.msg
  if ctx.auth then
    out[#out + 1] = "auth=pass smtp.auth=" .. pvalue(ctx.auth)
  end
  local spf = msg.spf
  if spf and spf.official then
    local part = "spf=" .. spf.official .. " smtp.mailfrom=" .. pvalue(spf.identity)
    if spf.helo_name and spf.helo_name ~= "" then
      part = part .. " smtp.helo=" .. pvalue(spf.helo_name)
    end
    out[#out + 1] = part
  end
  local external = not (client.internal or client.authenticated or client.trusted
    or client.localhost)
  if opts.iprev and external and client.ip then
    local result, name = iprev(client.ip)
    local part = "iprev=" .. result .. " policy.iprev=" .. pvalue(client.ip)
    if name then part = part .. " " .. comment(name) end
    out[#out + 1] = part
  end
  if msg.dkim then
    if #msg.dkim == 0 then out[#out + 1] = "dkim=none" end
    for _, sig in ipairs(msg.dkim) do
      local part = "dkim=" .. sig.result
      if sig.reason then part = part .. " " .. comment(sig.reason) end
      out[#out + 1] = part .. " header.d=" .. pvalue(sig.domain) .. " header.s="
        .. pvalue(sig.selector) .. " header.a=" .. sig.algorithm
    end
  end
  local dmarc = msg.dmarc
  if dmarc and dmarc.domain ~= "" then
    out[#out + 1] = "dmarc=" .. dmarc.result .. " " .. comment("p=" .. dmarc.policy)
      .. " header.from=" .. pvalue(dmarc.domain)
  end
  if msg.arc then
    out[#out + 1] = "arc=" .. msg.arc.result
  end
  return out
end

return {
  description = "one Authentication-Results header from the spf, dkim and dmarc results; forged ones with our authserv-id removed",
  options = {
    authserv_id = "",
    iprev = true,
    remove_forged = true,
    arc_seal = "",
  },

  setup = function(opts)
    if opts.arc_seal == "" then return end
    dkim = require "milter.dkim"
    if not dkim.has_key(opts.arc_seal) then
      error("arc_seal: no [dkim.keys] entry for " .. opts.arc_seal, 0)
    end
  end,

  eom = function(ctx, opts)
    local id = opts.authserv_id ~= "" and opts.authserv_id or ctx.receiver
    if opts.remove_forged then
      local n, forged = 0, {}
      for _, h in ipairs(ctx.headers) do
        if h.name:lower() == "authentication-results" then
          n = n + 1
          if authserv_id(h.value) == id:lower() then forged[#forged + 1] = n end
        end
      end
      -- Last first: deleting one does not move the index of an earlier one.
      for i = #forged, 1, -1 do ctx:delete_header("Authentication-Results", forged[i]) end
    end
    local results = parts(ctx, opts)
    if #results == 0 then return end
    local value = id .. "; " .. table.concat(results, "; ")
    ctx:insert_header(0, "Authentication-Results", value)
    if dkim then
      local ok, err = dkim.seal(ctx, value, opts.arc_seal)
      if not ok then milter.log.warn("authres: cannot ARC-seal: " .. err) end
    end
  end,
}
