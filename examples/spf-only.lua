-- spf-only.lua: the classic simple SPF milter.
--  * checks the MAIL FROM identity (the null sender as postmaster@HELO),
--  * refuses an SPF fail with the domain's explanation,
--  * answers a temporary DNS failure (temperror) with a 4xx so the sender retries,
--  * adds a Received-SPF header to every accepted message.
-- Internal clients and localhost are not checked.
local milter = require "milter"
local spf = require "milter.spf"
local net = require "milter.net"

return {
  description = "reject SPF fail, tempfail on temperror, add Received-SPF",
  options = { skip_networks = { "127.0.0.0/8", "::1" } },

  connect = function(ctx, hostname, ip, opts)
    local skip = net.ipset(opts.skip_networks)
    ctx.vars.skip = ip == nil or skip:contains(ip)
  end,

  mail = function(ctx, sender)
    if ctx.vars.skip then return end
    local r = spf.check_host(ctx.client.ip, sender, ctx.helo)
    ctx.msg.spf = r
    if r.result == "fail" then
      return milter.reject{ code = 550, xcode = "5.7.23", text = "SPF fail: " .. r.explanation }
    elseif r.result == "permerror" then
      return milter.reject{ code = 550, xcode = "5.5.2", text = "SPF record error: " .. r.explanation }
    elseif r.result == "temperror" then
      return milter.tempfail{ code = 451, xcode = "4.4.3", text = "SPF temporary error, try again later" }
    end
  end,

  eom = function(ctx)
    if ctx.msg.spf then
      ctx:insert_header(0, "Received-SPF", ctx.msg.spf.received_spf)
    end
  end,
}
