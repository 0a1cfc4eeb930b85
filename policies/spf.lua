-- spf: the classic milter's SPF policy language (stock pack).
--
-- At MAIL, for clients that are not internal, authenticated, trusted or localhost:
--   1. the official result: trusted forwarders first (the client passes SPF as the forwarder:
--      treated as pass, message whitelisted), else check_host for MAIL FROM (`<>` is checked as
--      postmaster@HELO), with `delegate` records for domains that publish none;
--   2. temperror: the `SPF-TempError` policy (default: 451 4.4.3 at once), else read as none;
--   3. the HELO check when MAIL FROM did not pass, with its `HELO-<Result>` policy;
--   4. MAIL FROM in [site] internal_domains without an SPF record: refused;
--   5. best guess (off by default) for none; a guess never yields fail;
--   6. three strikes: dynamic or no PTR, no SPF record, no pass for MAIL FROM or HELO →
--      `SPF-None` policy;
--   7. the `SPF-<Result>` policy of the effective result (access map, else program defaults).
-- CBV and DSN policy values queue a call-back for the cbv policy (ctx.msg.cbv, cbv_template,
-- cbv_target). Publishes ctx.msg.spf (for the authres and dmarc policies); at eom inserts
-- Received-SPF at the top.
-- Every default and reply is documented in docs/policies/spf.md.
local milter = require "milter"
local spf = require "milter.spf"
local dns = require "milter.dns"
local net = require "milter.net"
local site = require "milter.site"
local access = require "milter.access"
local store = require "milter.store"
local domain_ban = require "lib.domain_ban"
local replies = require "lib.replies"

-- The access-map tag spelling of each result.
local TAG = {
  pass = "Pass", fail = "Fail", softfail = "Softfail", neutral = "Neutral", none = "None",
  permerror = "PermError", temperror = "TempError",
}

local function member(list, value)
  if value == nil then return false end
  for _, item in ipairs(list) do
    if item:lower() == value then return true end
  end
  return false
end

-- Reply lines from an option's template lines: {key} replaced by `values`, control characters
-- made spaces, each line cut to what SMTP allows.
local function lines(template, values)
  local out = {}
  for i, text in ipairs(milter.fill(template, values)) do
    out[i] = text:gsub("%c", " "):sub(1, 980)
  end
  return out
end

-- Whether `name` is `domain` or a subdomain of it.
local function within(name, domain)
  name, domain = name:lower(), domain:lower()
  return name == domain or name:sub(-#domain - 1) == "." .. domain
end

-- A guessed result is never evidence of forgery, and a guess that could not be evaluated
-- leaves the result as it was.
local function guessed_result(result)
  if result == "fail" or result == "softfail" then return "neutral" end
  if result == "temperror" or result == "permerror" then return "none" end
  return result
end

-- The domain's substitute record published at <domain>._spf.<delegate>, if any.
local function delegated_record(domain, delegate)
  local records = dns.txt(domain .. "._spf." .. delegate)
  for _, record in ipairs(records or {}) do
    local version = record:sub(1, 7):lower()
    if version == "v=spf1 " or record:lower() == "v=spf1" then return record end
  end
end

-- Bans the client address in the store (never for internal, trusted or localhost clients).
local function ban_client(ctx, reason, opts)
  local client = ctx.client
  if client.internal or client.trusted or client.localhost or not client.ip then return end
  local ok, err = store.ban("ip", client.ip, reason, opts.ban_ttl)
  if not ok then milter.log.warn("spf: cannot ban " .. client.ip .. ": " .. tostring(err)) end
end

-- Queues a call-back for the cbv policy (docs/policies/cbv.md): the first one queued counts,
-- and the null sender is never called back.
local function queue_cbv(ctx, action, template, target)
  if ctx.msg.cbv or ctx.sender == "" then return end
  ctx.msg.cbv, ctx.msg.cbv_template, ctx.msg.cbv_target = action, template, target
end

-- Applies an access-map action: nil for OK, WHITELIST, CBV and DSN (the check passes; CBV and
-- DSN queue a call-back with `reply.template`), else the reply
-- `reply` = { code, xcode, lines, immediate } as a reject (a tempfail for TEMPFAIL, or when the
-- reply is a 4xx one).
local function act(ctx, state, action, reply, reason, opts)
  state.policy = action
  if action == "OK" then return nil end
  if action == "CBV" or action == "DSN" then
    queue_cbv(ctx, action, reply.template, reply.target)
    return nil
  end
  if action == "WHITELIST" then
    state.whitelist, ctx.msg.listed = true, "WHITELIST"
    return nil
  end
  milter.log.debug("spf: " .. action .. " " .. reason)
  if action == "BAN" then
    ban_client(ctx, reason, opts)
  elseif ctx.demerits > 0 then
    ctx:demerit(1, "spf: " .. reason .. " from an offending client")
  end
  local code, xcode = reply.code, reply.xcode
  if action == "TEMPFAIL" or code < 500 then
    return milter.tempfail{ code = 451, xcode = "4" .. xcode:sub(2), text = reply.lines }
  end
  return milter.reject{ code = code, xcode = xcode, text = reply.lines, immediate = reply.immediate }
end

-- The program default of `SPF-<result>` when the access map has no entry.
local function default_action(state, opts, dynamic)
  local result, domain = state.effective, state.domain
  if result == "fail" then return member(opts.accept_fail, domain) and "CBV" or "REJECT" end
  if result == "permerror" then return "REJECT" end
  if result == "softfail" then
    if member(opts.accept_softfail, domain) or not dynamic or state.helo == "pass" then
      return "OK"
    end
    return "REJECT"
  end
  if result == "neutral" then
    if member(opts.reject_neutral, domain) then return "REJECT" end
    if (not dynamic or state.helo == "pass") and not state.guessed then return "OK" end
    return "REJECT"
  end
  return "OK"
end

-- Received-SPF: the official result's header, plus x-helo-spf when HELO was checked and is
-- not the checked domain, and x-bestguess when the effective result differs.
-- authentication_results and authserv_id moved to the authres policy: configs that still set
-- them load, and the first message says where the header went.
local warned_moved = false
local function warn_moved_options(opts)
  if warned_moved or (not opts.authentication_results and opts.authserv_id == "") then return end
  warned_moved = true
  milter.log.warn("spf: authentication_results and authserv_id are no longer used;",
    "add the authres policy to the chain for Authentication-Results (docs/policies/authres.md)")
end

local function received_spf(state, official, helo)
  local value = official.received_spf
  if state.helo and helo:lower() ~= (state.domain or "") then
    value = value .. "; x-helo-spf=" .. state.helo
  end
  if state.effective ~= state.official then
    value = value .. "; x-bestguess=" .. state.effective
  end
  return value
end

-- The official result: a passing trusted forwarder, else check_host for MAIL FROM (with the
-- delegated record for a domain that publishes none).
local function official_result(ctx, state, sender, helo, opts)
  local ip = ctx.client.ip
  for _, forwarder in ipairs(opts.trusted_forwarders) do
    local r = spf.check_host(ip, "", forwarder)
    if r.result == "none" then r = spf.best_guess(ip, "", forwarder, opts.forwarder_guess) end
    if r.result == "pass" then
      milter.log.debug("spf: trusted forwarder " .. forwarder)
      state.forwarder, state.whitelist, ctx.msg.listed = forwarder, true, "WHITELIST"
      state.identity, state.domain = "postmaster@" .. forwarder, forwarder
      return r
    end
  end
  local r = spf.check_host(ip, sender, helo)
  if r.result == "none" and opts.delegate ~= "" and state.domain then
    local record = delegated_record(state.domain, opts.delegate)
    if record then
      r = spf.best_guess(ip, sender, helo, record)
      if r.guessed then
        r.guessed = false
        r.received_spf = r.received_spf:gsub("best guess: ", "delegated to " .. opts.delegate .. ": ", 1)
        state.delegated = true
      end
    end
  end
  return r
end

return {
  description = "the SPF policy language of the classic milter: SPF and HELO results, access map, best guess, three strikes",
  options = {
    trusted_forwarders = {},
    forwarder_guess = "v=spf1 a mx ?all",
    delegate = "",
    best_guess = false,
    guess_record = "v=spf1 a/24 mx/24 ptr ?all",
    guess_record_dynamic = "v=spf1 a/24 mx/24 ?all",
    helo_guess_record = "v=spf1 a mx ?all",
    reject_noptr = false,
    accept_softfail = {},
    accept_fail = {},
    reject_neutral = {},
    helo_ban = { "gmail.com" },
    ban_ttl = milter.duration "7d",
    ban_pass_domain = true,
    email_providers = domain_ban.email_providers,
    received_spf = true,
    authentication_results = false, -- no longer used (the authres policy): accepted, warned about
    authserv_id = "",               -- no longer used (the authres policy): accepted, warned about
    fail_reply = { "SPF fail: {explanation}" },
    softfail_reply = {
      "SPF softfail: If you get this Delivery Status Notice, your email",
      "was probably legitimate.  Your administrator has published SPF",
      "records in a testing mode.  The SPF record reported your email as",
      "a forgery, which is a mistake if you are reading this.  Please",
      "notify your administrator of the problem immediately.",
    },
    neutral_reply = {
      "mail from {domain} must pass SPF",
      "The {domain} domain is one that spammers love to forge.  Due to",
      "the volume of forged mail, we can only accept mail that",
      "the SPF record for {domain} explicitly designates as legitimate.",
      "Sending your email through the recommended outgoing SMTP",
      "servers for {domain} should accomplish this.",
    },
    pass_reply = {
      "We don't accept mail from {domain}",
      "Your email from {domain} comes from an authorized server, however",
      "we still don't want it - we just don't like {domain}.",
    },
    permerror_reply = {
      "{explanation}",
      "There is a fatal syntax error in the SPF record for {domain}",
      "We cannot accept mail from {domain} until this is corrected.",
    },
    temperror_reply = {
      "{explanation}",
      "We cannot accept your email until the DNS server for {domain}",
      "is operational for TXT record queries.",
    },
    helo_reply = {
      "{explanation}",
      "The hostname given in your MTA's HELO response is not listed",
      "as a legitimate MTA in the SPF records for your domain.  If you",
      "get this bounce, the message was not in fact a forgery, please",
      "IMMEDIATELY notify your email administrator of the problem.",
    },
    none_reply = {
      "There is a problem with {sender}: the HELO name {helo} does not",
      "pass SPF, there is no valid PTR record for {ip}, and {domain}",
      "publishes no SPF record.  Your mail server is severely misconfigured.",
    },
    self_reply = { "I hate talking to myself!" },
  },

  mail = function(ctx, sender, args, opts)
    local client = ctx.client
    if client.internal or client.authenticated or client.trusted or client.localhost
        or not client.ip then
      return
    end
    local ip, helo, dynamic = client.ip, ctx.helo or "", client.dynamic
    local address = net.parse_address(sender)
    local null = address ~= nil and address.address == ""
    local state = { helo_name = helo, guessed = false, whitelist = false }
    if null then
      state.identity, state.domain = "postmaster@" .. helo, helo ~= "" and helo:lower() or nil
    else
      state.identity = address and address.address or sender
      state.domain = address and address.domain
    end
    ctx.msg.spf = state

    local official = official_result(ctx, state, sender, helo, opts)
    state.official, state.effective = official.result, official.result
    state.explanation, state.mechanism = official.explanation, official.mechanism
    local values = {
      sender = null and "<>" or state.identity, ip = ip, helo = helo,
      domain = state.domain or state.identity, explanation = official.explanation,
    }
    local function reply(template, code, xcode, immediate, dsn)
      return { code = code, xcode = xcode, lines = lines(template, values), immediate = immediate,
        template = dsn }
    end
    local function policy(result)
      return access.lookup("SPF-" .. TAG[result], state.identity)
    end

    if state.effective == "temperror" then
      local action = policy("temperror") or "REJECT"
      -- A call-back cannot help while the sender's DNS is failing: read as none.
      if action == "CBV" or action == "DSN" then action = "OK" end
      local verdict = act(ctx, state, action, reply(opts.temperror_reply, 451, "4.4.3", true),
        "SPF temperror for " .. state.identity, opts)
      if verdict then return verdict end
      state.effective = "none"
    end

    if state.effective ~= "pass" then
      if null then
        state.helo = state.effective
      elseif helo ~= "" then
        local h = spf.check_helo(ip, helo)
        state.helo = h.result
        local action = access.lookup("HELO-" .. TAG[h.result], helo)
        if not action then
          local bad = h.result == "fail" or h.result == "softfail" or h.result == "neutral"
          action = bad and (member(opts.helo_ban, helo:lower()) and "BAN" or "REJECT") or "OK"
        end
        local helo_values = setmetatable({ explanation = h.explanation }, { __index = values })
        local verdict = act(ctx, state, action,
          { code = 550, xcode = "5.7.1", lines = replies.lines("helofail",
              { { "mfrom", values.sender }, { "helo", helo }, { "ip", ip } },
              lines(opts.helo_reply, helo_values)),
            template = "heloerror", target = "postmaster@" .. helo },
          "HELO " .. helo .. " SPF " .. h.result, opts)
        if verdict then return verdict end
        if h.result == "none" and opts.best_guess and not net.looks_dynamic(helo, ip) then
          state.helo = guessed_result(spf.best_guess(ip, "", helo, opts.helo_guess_record).result)
        end
      end

      if official.result == "none" and not null and state.domain
          and site.internal_domain(state.domain) then
        return milter.reject{ code = 550, xcode = "5.7.1", text = lines(opts.self_reply, values) }
      end

      if opts.best_guess and state.effective == "none" then
        local record = dynamic and opts.guess_record_dynamic or opts.guess_record
        local g = spf.best_guess(ip, sender, helo, record)
        if g.guessed then
          state.effective, state.guessed = guessed_result(g.result), true
        end
        if state.effective ~= "pass" and state.helo == "pass" and state.domain
            and within(helo, state.domain) then
          state.effective, state.guessed = "pass", true
        end
      end

      if dynamic and official.result == "none" and state.effective ~= "pass"
          and state.helo ~= "pass" then
        state.effective, state.three_strikes = "none", true
        local action = policy("none") or (opts.reject_noptr and "REJECT" or "CBV")
        local anon = reply(opts.none_reply, 550, "5.7.1", false, "strike3")
        anon.lines = replies.lines("anon",
          { { "mfrom", values.sender }, { "helo", helo }, { "ip", ip } }, anon.lines)
        local verdict = act(ctx, state, action, anon,
          "no PTR, HELO or SPF for " .. state.identity, opts)
        if verdict then
          ctx:demerit(1, "spf: no PTR, HELO or SPF")
          return verdict
        end
      end
    end

    state.received_spf = received_spf(state, official, helo)
    local result = state.effective
    if result == "none" then return end
    local action = policy(result) or default_action(state, opts, dynamic)
    local reason = "SPF " .. result .. " for " .. state.identity
    if result == "pass" then
      if action == "BAN" and opts.ban_pass_domain then
        local kind, what = domain_ban.ban(ctx, "access map SPF-Pass BAN",
          { email_providers = opts.email_providers })
        milter.log.info("spf: SPF-Pass BAN: " .. tostring(kind) .. " " .. tostring(what))
      end
      return act(ctx, state, action, reply(opts.pass_reply, 550, "5.7.1", true, "pass"), reason,
        opts)
    elseif result == "fail" then
      local verdict = act(ctx, state, action, reply(opts.fail_reply, 550, "5.7.1", false, "fail"),
        reason, opts)
      if verdict and state.domain and site.hello_blacklisted(state.domain) then
        ctx:demerit(4, "spf: fail for our own name " .. state.domain)
      end
      return verdict
    elseif result == "softfail" then
      return act(ctx, state, action,
        reply(opts.softfail_reply, 550, "5.7.1", false, "softfail"), reason, opts)
    elseif result == "neutral" then
      return act(ctx, state, action,
        reply(opts.neutral_reply, 550, "5.7.1", false, "neutral"), reason, opts)
    elseif result == "permerror" then
      return act(ctx, state, action,
        reply(opts.permerror_reply, 550, "5.5.2", false, "permerror"), reason, opts)
    end
  end,

  eom = function(ctx, opts)
    warn_moved_options(opts)
    local state = ctx.msg.spf
    if not state or not state.received_spf then return end
    if opts.received_spf then
      ctx:insert_header(0, "Received-SPF", state.received_spf)
    end
  end,
}
