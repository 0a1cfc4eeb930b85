-- greylist: refuse a new (client, sender, recipient) triplet for a while; real MTAs retry
-- (stock pack; the classic milter's algorithm over the store's greylist primitive).
--
-- RCPT: the client part of the triplet is the MAIL FROM domain when SPF passed (ctx.msg.spf),
-- else the client IP grouped by /24 (IPv4) or /64 (IPv6). A new triplet is refused with
-- 451 4.7.1 for `delay`; a retry after that and within `expire` of first sight passes; a passed
-- triplet keeps passing while it is used at least every `retain`.
-- Never greylisted: internal, authenticated, trusted and localhost clients, the null sender,
-- senders the whitelist policy listed (ctx.msg.listed: WHITELIST or PROBATION; BLACKLIST is
-- refused there), a message already holding a delayed reject (ctx.delayed), a bounce to a
-- return path the srs policy verified (ctx.msg.signed[rcpt]), and a sender with a good
-- reputation (ctx.msg.reputable, from the reputation policy).
local milter = require "milter"
local store = require "milter.store"
local domain_ban = require "lib.domain_ban"

local function exempt(ctx, rcpt)
  local client = ctx.client
  return client.ip == nil or client.internal or client.authenticated or client.trusted
    or client.localhost or ctx.sender == "" or ctx.msg.listed ~= nil or ctx.delayed ~= nil
    or (ctx.msg.signed ~= nil and ctx.msg.signed[rcpt] ~= nil) or ctx.msg.reputable
end

local fill = milter.fill

return {
  description = "greylist new (client, sender, recipient) triplets from outside",
  options = {
    delay = milter.duration "5m",
    expire = milter.duration "6h",
    retain = milter.duration "36d",
    reply = { "Greylisted", "Please retry in {minutes} minutes" },
    fail_closed = false,
    unavailable_reply = "Greylisting is unavailable, try again later",
  },

  -- Durations are checked at load: a bad one is reported by `luamilter check`.
  setup = function(opts)
    for _, key in ipairs{ "delay", "expire", "retain" } do
      if opts[key] <= 0 then
        error(("[policy.greylist] %s must be longer than 0, got %s"):format(key, opts[key]), 0)
      end
    end
    if opts.expire <= opts.delay then
      error(("[policy.greylist] expire (%ss) must be longer than delay (%ss)"):format(opts.expire, opts.delay), 0)
    end
  end,

  rcpt = function(ctx, rcpt, args, opts)
    if exempt(ctx, rcpt) then return end
    -- The SPF-validated sender domain (lib.domain_ban: identified by SPF pass), else the IP.
    local client = domain_ban.identified(ctx) or ctx.client.ip
    local verdict, n = store.greylist(client, ctx.sender, rcpt, {
      delay = opts.delay, retry_window = opts.expire, lifetime = opts.retain,
    })
    if verdict == "wait" then
      local values = { minutes = tostring(math.ceil(n / 60)), seconds = tostring(n) }
      local text = fill(opts.reply, values)
      milter.log.debug("greylisted", client, ctx.sender, rcpt, "for", n, "s")
      return milter.tempfail{ code = 451, xcode = "4.7.1", text = text }
    elseif verdict == "pass" then
      milter.log.debug("greylist passed", client, ctx.sender, rcpt, n)
    else
      -- The store logs its failure as a warning, at most one every 10 s: no line per message.
      milter.log.debug("greylist: store", n)
      if opts.fail_closed then
        return milter.tempfail{ code = 451, xcode = "4.3.0", text = opts.unavailable_reply }
      end
    end
  end,
}
