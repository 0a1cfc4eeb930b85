-- A test helper for tests/cases/spf*.toml: refuses clients and sender domains banned in the
-- store (as the bans policy does), and shows at eom what the spf policy published in ctx.msg.spf
-- and the connection's demerits, in an X-Spf-Facts header.
local milter = require "milter"
local store = require "milter.store"
local net = require "milter.net"

local function refuse(text)
  return milter.reject{ code = 550, xcode = "5.7.1", text = text, immediate = true }
end

return {
  description = "test helper: refuse banned IPs and domains, show ctx.msg.spf",
  connect = function(ctx, hostname, ip)
    if ip and store.banned("ip", ip) then return refuse("probe: banned ip " .. ip) end
  end,
  mail = function(ctx, sender)
    local _, domain = net.split(sender)
    if domain and store.banned("domain", domain) then return refuse("probe: banned domain " .. domain) end
  end,
  eom = function(ctx)
    local s = ctx.msg.spf
    if not s then return end
    ctx:add_header("X-Spf-Facts", string.format(
      "official=%s effective=%s guessed=%s helo=%s domain=%s whitelist=%s three_strikes=%s forwarder=%s demerits=%d",
      s.official, s.effective, tostring(s.guessed), tostring(s.helo), tostring(s.domain),
      tostring(s.whitelist), tostring(s.three_strikes), tostring(s.forwarder), ctx.demerits))
  end,
}
