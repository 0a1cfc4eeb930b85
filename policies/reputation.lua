-- reputation: learn from the chain's own verdicts which senders send spam (stock pack; the
-- successor of the classic milter's GOSSiP).
--
-- Identity of a message: the SPF-validated sender domain (ctx.msg.spf pass, from the spf
-- policy); for a trusted forwarder or a trusted relay, the original sender's domain (MAIL FROM);
-- otherwise the client's /24 (IPv6: /64) with the HELO name. Per identity the store keeps two
-- decaying amounts, ham and spam (store.decay, half-life `half_life`), shared by every MX host
-- on a Redis store.
-- MAIL: looks the identity up and publishes ctx.msg.reputation = { identity, score, confidence,
-- ham, spam }; a good reputation sets ctx.msg.reputable (the greylist policy skips it).
-- RCPT: a bad reputation held with enough confidence refuses every recipient but the
-- exempt_recipients (postmaster). A recipient the MTA refused itself counts as spam.
-- EOM: adds X-Reputation; the message was delivered: it teaches ham, or spam when a policy
-- refused or discarded part of it or marked it ctx.msg.spam (the honeypot policy).
-- ABORT: a message refused or discarded by a policy teaches spam. Its own refusals teach
-- nothing (no feedback loop); tempfails (greylisting) teach nothing.
local milter = require "milter"
local store = require "milter.store"
local net = require "milter.net"
local domain_ban = require "lib.domain_ban"

local fill = milter.fill

-- The first four groups of an IPv6 address, its /64.
local function ipv6_prefix(ip)
  local head, tail = ip:lower():match("^([^%%]-)::(.*)$")
  local groups = {}
  for g in (head or ip):gmatch("[^:]+") do groups[#groups + 1] = g end
  if head then
    local rest = {}
    for g in tail:gmatch("[^:]+") do rest[#rest + 1] = g end
    for _ = #groups + #rest + 1, 8 do groups[#groups + 1] = "0" end
  end
  for i = 1, 4 do groups[i] = string.format("%x", tonumber(groups[i] or "0", 16) or 0) end
  return table.concat(groups, ":", 1, 4) .. "::/64"
end

local function client_prefix(ip)
  local v4 = ip:match("^(%d+%.%d+%.%d+)%.%d+$")
  if v4 then return v4 .. ".0/24" end
  return ipv6_prefix(ip)
end

-- The identity the message is scored by, or nil (no IP and no identified sender).
local function identity(ctx)
  local spf = type(ctx.msg.spf) == "table" and ctx.msg.spf or {}
  if spf.forwarder or ctx.client.trusted then
    local _, domain = net.split(ctx.sender or "")
    if domain and domain ~= "" then return "forwarded:" .. domain:lower() end
    return nil
  end
  local domain = domain_ban.identified(ctx)
  if domain then return "spf:" .. domain end
  if not ctx.client.ip then return nil end
  return "client:" .. client_prefix(ctx.client.ip) .. "," .. (ctx.helo or ""):lower()
end

local function key(id) return "reputation:" .. id end

-- Score in -1..1 (all ham: towards 1) and confidence in 0..1 (how much evidence there is).
local function rate(amounts, opts)
  local ham, spam = amounts.ham or 0, amounts.spam or 0
  local n = ham + spam
  return (ham - spam) / (n + 1), n / (n + opts.confidence_weight), ham, spam
end

-- Whether a policy other than this one refused or discarded the message or one of its
-- recipients (ctx.verdicts holds them all; this policy counts its own refusals).
local function refused_by_others(ctx, rep)
  local refusals = 0
  for _, v in ipairs(ctx.verdicts) do
    if v.action == "reject" or v.action == "discard" then refusals = refusals + 1 end
  end
  return refusals > rep.own_refusals
end

-- Internal, authenticated and localhost clients are neither scored nor learned from.
local function learning(ctx)
  local client = ctx.client
  return not (client.internal or client.localhost or client.authenticated)
end

-- The message's reputation state, ctx.msg.reputation: made at MAIL (then filled by the lookup),
-- or later for a message refused before this policy's MAIL handler ran (it still teaches
-- spam). nil: not scored (no identity, or a client that is not learned from).
local function state(ctx)
  local rep = ctx.msg.reputation
  if rep then return rep end
  if not learning(ctx) then return nil end
  local id = identity(ctx)
  if not id then return nil end
  rep = { identity = id, score = 0, confidence = 0, ham = 0, spam = 0, own_refusals = 0 }
  ctx.msg.reputation = rep
  return rep
end

local function learn(rep, what, why, opts)
  if rep.learned then return end
  rep.learned = what
  local ok, err = store.decay(key(rep.identity), opts.half_life, { [what] = 1 })
  if ok then
    milter.log.debug("reputation: " .. rep.identity .. " learned " .. what .. " (" .. why .. ")")
  else
    milter.log.debug("reputation: cannot learn", rep.identity, err)
  end
end

local function spam_reason(ctx, rep)
  if ctx.msg.spam then return tostring(ctx.msg.spam) end
  if rep.bad_rcpt then return "bad recipient " .. rep.bad_rcpt end
  if refused_by_others(ctx, rep) then return "refused by policy" end
  return nil
end

local function exempt_recipient(rcpt, exempt)
  local user = (net.split(rcpt) or rcpt):lower()
  for _, name in ipairs(exempt) do
    if user == name:lower() then return true end
  end
  return false
end

return {
  description = "learn sender reputation from the chain's verdicts; skip greylisting for good senders, refuse bad ones",
  needs = { "rejected_recipients" },
  macros = { rcpt = { "{rcpt_mailer}" } },
  options = {
    half_life = milter.duration "30d",
    confidence_weight = 10,
    good_score = 0.4,
    good_confidence = 0.2,
    bad_score = -0.5,
    bad_confidence = 0.3,
    exempt_recipients = { "postmaster", "abuse" },
    reply = "{identity} has been sending mostly spam",
    header = "X-Reputation",
  },

  setup = function(opts)
    if opts.half_life <= 0 then
      error("[policy.reputation] half_life must be longer than 0", 0)
    end
    if opts.confidence_weight <= 0 then
      error("[policy.reputation] confidence_weight must be above 0", 0)
    end
  end,

  mail = function(ctx, sender, args, opts)
    local rep = state(ctx)
    if not rep then return end
    local amounts, err = store.decay(key(rep.identity), opts.half_life)
    if not amounts then
      milter.log.debug("reputation: cannot look up", rep.identity, err)
      amounts = {}
    end
    rep.score, rep.confidence, rep.ham, rep.spam = rate(amounts, opts)
    if rep.score > opts.good_score and rep.confidence >= opts.good_confidence then
      ctx.msg.reputable = true
    end
  end,

  rcpt = function(ctx, rcpt, args, opts)
    local rep = state(ctx)
    if not rep then return end
    if ctx:macro("rcpt_mailer") == "error" then
      rep.bad_rcpt = rep.bad_rcpt or rcpt
      return
    end
    if rep.score < opts.bad_score and rep.confidence >= opts.bad_confidence
      and not exempt_recipient(rcpt, opts.exempt_recipients) then
      rep.own_refusals = rep.own_refusals + 1
      milter.log.debug(("reputation: refused %s (score %.2f, confidence %.2f)")
        :format(rep.identity, rep.score, rep.confidence))
      local name = rep.identity:gsub("^%a+:", "")
      return milter.reject{ code = 550, xcode = "5.7.1",
        text = fill(opts.reply, { identity = name }) }
    end
  end,

  eom = function(ctx, opts)
    local rep = ctx.msg.reputation
    if not rep then return end
    if opts.header and opts.header ~= "" then
      ctx:add_header(opts.header, ("%s; score=%.2f; confidence=%.2f; ham=%.1f spam=%.1f")
        :format(rep.identity, rep.score, rep.confidence, rep.ham, rep.spam))
    end
    local why = spam_reason(ctx, rep)
    learn(rep, why and "spam" or "ham", why or "delivered", opts)
  end,

  abort = function(ctx, opts)
    local rep = state(ctx)
    if not rep then return end
    local why = spam_reason(ctx, rep)
    if why then learn(rep, "spam", why, opts) end
  end,
}
