-- bench_full.lua: the every-stage policy the benchmarks compare with
-- `native_baseline ADDR full` (examples/native_baseline.rs). Connect classifies the client IP,
-- HELO is checked, each RCPT is checked, headers are counted, body bytes are counted, and end
-- of message adds a header with the tallies.
local milter = require "milter"

local NETWORKS = {
  { "^127%.", "loopback" },
  { "^10%.", "private" },
  { "^192%.168%.", "private" },
  { "^192%.0%.2%.", "documentation" },
}
local BLOCKED_RCPT = { ["blocked@example.net"] = true }

return {
  connect = function(ctx, host, ip)
    ctx.vars.class = "public"
    for _, net in ipairs(NETWORKS) do
      if ip and ip:find(net[1]) then
        ctx.vars.class = net[2]
        break
      end
    end
  end,
  helo = function(ctx, name)
    if not name:find(".", 1, true) or name:sub(1, 1) == "[" then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "Bad HELO" }
    end
  end,
  mail = function(ctx, sender)
    if sender == "spam@bad.example" then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "Sender refused" }
    end
    ctx.msg.headers = 0
    ctx.msg.body = 0
  end,
  rcpt = function(ctx, rcpt)
    if BLOCKED_RCPT[rcpt:lower()] then
      return milter.reject{ code = 550, xcode = "5.1.1", text = "No such user" }
    end
  end,
  header = function(ctx, name, value)
    ctx.msg.headers = ctx.msg.headers + 1
  end,
  body = function(ctx, chunk)
    ctx.msg.body = ctx.msg.body + #chunk
  end,
  eom = function(ctx)
    ctx:add_header("X-Policy", string.format("checked; client=%s; headers=%d; body=%d",
      ctx.vars.class, ctx.msg.headers, ctx.msg.body))
    return milter.accept()
  end,
}
