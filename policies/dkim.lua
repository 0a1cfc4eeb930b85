-- dkim: DKIM verification and signing, the classic milter's way (stock pack).
--
-- At eom:
--   * mail from internal clients and authenticated users whose From domain has a `[dkim] keys`
--     entry is signed (relaxed/relaxed, the header inserted at the top); nothing is verified;
--   * other mail is verified: every DKIM-Signature, and the ARC chain. The results are
--     published as ctx.msg.dkim (the list milter.dkim.verify returns) and ctx.msg.arc, for the
--     dmarc and authres policies;
--   * the access map is asked, for each signature, for DKIM-<Result>:<d= domain>, and when no
--     signature of the From domain (or a parent of it) passed, for DKIM-None:<From domain>.
--     REJECT refuses the message (550 5.7.1 "DKIM <result> for <domain>"), TEMPFAIL delays it
--     (451 4.7.1), WHITELIST marks it whitelisted (ctx.msg.listed), OK does nothing.
-- Every default and reply is documented in docs/policies/dkim.md.
local milter = require "milter"
local dkim = require "milter.dkim"
local access = require "milter.access"

-- The access-map tag spelling of each result.
local TAG = {
  pass = "Pass", fail = "Fail", policy = "Policy", neutral = "Neutral", permerror = "PermError",
  temperror = "TempError", none = "None",
}

-- Whether `name` is `domain` or a subdomain of it.
local function within(name, domain)
  name, domain = name:lower(), domain:lower()
  return name == domain or name:sub(-#domain - 1) == "." .. domain
end

-- The From domain, as the dmarc policy reads it.
local function from_domain(ctx)
  local from = ctx:header("From")
  return from and from:match("@([%w.-]+)")
end

-- The access-map decision for `result` and `domain`, as a verdict (nil: go on).
local function act(ctx, result, domain, opts)
  local action = access.lookup("DKIM-" .. TAG[result], domain)
  if action == nil or action == "OK" then return nil end
  if action == "WHITELIST" then
    ctx.msg.listed = "WHITELIST"
    return nil
  end
  local text = milter.fill(opts.reply, { result = result, domain = domain })
  milter.log.debug("dkim: " .. action .. " " .. text)
  if action == "TEMPFAIL" then
    return milter.tempfail{ code = 451, xcode = "4.7.1", text = text }
  end
  return milter.reject{ code = 550, xcode = "5.7.1", text = text }
end

return {
  description = "verify DKIM signatures and the ARC chain, act on DKIM-<result> access entries, sign internal mail",
  options = {
    sign = true,
    verify = true,
    arc = true,
    reply = "DKIM {result} for {domain}",
  },

  eom = function(ctx, opts)
    local client = ctx.client
    if client.internal or client.authenticated then
      if opts.sign then
        local ok, err = dkim.sign(ctx)
        if not ok and err and not err:match("^no ") then
          milter.log.warn("dkim: cannot sign: " .. err)
        end
      end
      return
    end
    if not opts.verify then return end
    local results = dkim.verify(ctx)
    ctx.msg.dkim = results
    if opts.arc then ctx.msg.arc = dkim.arc(ctx) end
    local from = from_domain(ctx)
    local from_passed = false
    for _, r in ipairs(results) do
      if r.result == "pass" and from and within(from, r.domain) then from_passed = true end
    end
    for _, r in ipairs(results) do
      local verdict = act(ctx, r.result, r.domain, opts)
      if verdict then return verdict end
    end
    if from and not from_passed then
      return act(ctx, "none", from, opts)
    end
  end,
}
