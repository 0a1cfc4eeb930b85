-- honeypot: mail to a trap address is spam (stock pack; the classic milter's honeypot user).
--
-- RCPT: a recipient in `addresses` costs the client `demerits` (the bans policy turns them into
-- an IP ban) and marks the message ctx.msg.spam (the reputation policy learns it as spam).
-- EOM: a message whose recipients are all honeypots is discarded; one with real recipients too
-- is quarantined with the notice of lib/notice (a quarantine DSN to an SPF-pass sender, else a
-- call-back), without the honeypot recipients. Put it after the reputation policy, whose eom
-- must run to learn the spam.
local milter = require "milter"
local net = require "milter.net"
local notice = require "lib.notice"

-- Whether `rcpt` is one of the trap entries: "user@domain" (that address), "@domain" (every
-- address at the domain) or "user" (that local part at any domain).
local function trapped(rcpt, addresses)
  local user, domain = net.split(rcpt:lower())
  for _, entry in ipairs(addresses) do
    entry = entry:lower()
    if entry == rcpt:lower() or (domain and entry == "@" .. domain)
      or (not entry:find("@", 1, true) and entry == user) then
      return true
    end
  end
  return false
end

return {
  description = "honeypot recipients: demerits, spam for the reputation; discard or quarantine",
  options = {
    addresses = {},
    demerits = 4,
    reason = "sent to the honeypot",
  },

  rcpt = function(ctx, rcpt, args, opts)
    if not trapped(rcpt, opts.addresses) then return end
    ctx:demerit(opts.demerits, "honeypot recipient " .. rcpt)
    ctx.msg.spam = "honeypot " .. rcpt
    milter.log.debug("honeypot: " .. rcpt .. " from " .. (ctx.sender or "?"))
  end,

  eom = function(ctx, opts)
    if not ctx.msg.spam then return end
    local trap = {}
    for _, rcpt in ipairs(ctx.recipients) do
      if trapped(rcpt, opts.addresses) then trap[#trap + 1] = rcpt end
    end
    if #trap == 0 then return end
    if #trap == #ctx.recipients then return milter.discard() end
    for _, rcpt in ipairs(trap) do ctx:delete_rcpt("<" .. rcpt .. ">") end
    return notice.quarantine(ctx, opts.reason)
  end,
}
