-- Test stand-in for the stock spf policy, as far as the bans, greylist and whitelist cases need
-- it: checks MAIL FROM with milter.spf against the test DNS zones and publishes ctx.msg.spf in
-- the spf policy's documented shape ({ official, effective, guessed, domain, explanation }).
-- A passing sender whose access-map entry "SPF-Pass:<domain>" is REJECT or BAN is refused at
-- once, and BAN also bans the sender domain through lib.domain_ban, as the spf policy does.
-- Nothing else is refused.
local milter = require "milter"
local spf = require "milter.spf"
local net = require "milter.net"
local access = require "milter.access"
local domain_ban = require "lib.domain_ban"

return {
  description = "publish ctx.msg.spf; refuse SPF-Pass REJECT/BAN senders, ban BAN domains",
  options = { email_providers = domain_ban.email_providers },
  mail = function(ctx, sender, args, opts)
    if ctx.client.ip == nil then return end
    local r = spf.check_host(ctx.client.ip, sender, ctx.helo)
    local _, domain = net.split(sender)
    ctx.msg.spf = {
      official = r.result, effective = r.result, guessed = r.guessed,
      domain = domain, explanation = r.explanation,
    }
    local policy = r.result == "pass" and access.lookup("SPF-Pass", sender)
    if policy == "BAN" then
      assert(domain_ban.ban(ctx, "access map SPF-Pass BAN", { email_providers = opts.email_providers }))
    end
    if policy == "REJECT" or policy == "BAN" then
      return milter.reject{ code = 550, xcode = "5.7.1", immediate = true,
        text = "We don't accept mail from " .. domain }
    end
  end,
}
