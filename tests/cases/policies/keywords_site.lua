-- Test helper for tests/cases/keywords*.toml: stands in for the spf and whitelist policies and
-- for the bans policy's MAIL FROM check.
--
-- At MAIL: refuses a sender whose domain is banned or whose address is blacklisted in the
-- store; then publishes ctx.msg.spf (result from the macro {test_spf}, domain from the sender)
-- and ctx.msg.listed (from the macro {test_listed}) as the real policies would.
local milter = require "milter"
local net = require "milter.net"
local store = require "milter.store"

return {
  description = "test stand-in: banned/blacklisted senders refused, SPF and list facts from macros",
  macros = { mail = { "{test_spf}", "{test_listed}" } },

  mail = function(ctx, sender)
    local _, domain = net.split(sender)
    if domain then
      local ban = store.banned("domain", domain)
      if ban then
        return milter.reject{ code = 550, xcode = "5.7.1", text = "banned domain " .. ban.entry }
      end
    end
    if sender ~= "" and store.listed("blacklist", sender) then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "Sender email local blacklist" }
    end
    local spf = ctx:macro("{test_spf}")
    if spf then ctx.msg.spf = { official = spf, effective = spf, domain = domain } end
    ctx.msg.listed = ctx:macro("{test_listed}")
  end,
}
