-- auth: which MAIL FROM addresses an SMTP AUTH user may use (stock pack).
--
-- At MAIL, for an authenticated session: the access map is asked for tag SMTP-Auth and the
-- identity "<auth login>@<MAIL FROM domain>" (an unqualified MAIL FROM, or <>, has the domain
-- localhost.localdomain), in the usual order: SMTP-Auth:login@domain, SMTP-Auth:domain,
-- SMTP-Auth:.parent, SMTP-Auth:, SMTP-Auth. OK or WHITELIST (or no entry) lets the message
-- go on; REJECT or BAN refuse it at once; TEMPFAIL refuses it for now.
local milter = require "milter"
local access = require "milter.access"
local net = require "milter.net"

local fill = milter.fill

return {
  description = "restrict the MAIL FROM addresses of SMTP AUTH users by SMTP-Auth access entries",
  options = {
    unqualified_domain = "localhost.localdomain",
    reply = "SMTP user {user} is not authorized to use MAIL FROM {sender}.",
  },

  mail = function(ctx, sender, args, opts)
    local user = ctx.auth
    if not user then return end
    local _, domain = net.split(sender)
    if domain == nil or domain == "" then domain = opts.unqualified_domain end
    local identity = user .. "@" .. domain
    local value = access.lookup("SMTP-Auth", identity)
    if value == nil or value == "OK" or value == "WHITELIST" then return end
    local reply = {
      text = fill(opts.reply, { user = user, sender = sender ~= "" and sender or "<>" }),
      immediate = true,
    }
    if value == "TEMPFAIL" then
      reply.code, reply.xcode = 451, "4.7.1"
      return milter.tempfail(reply)
    end
    reply.code, reply.xcode = 550, "5.7.1"
    return milter.reject(reply)
  end,
}
