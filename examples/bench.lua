-- bench.lua: the trivial policy the benchmarks compare with examples/native_baseline.rs.
local milter = require "milter"

return {
  mail = function(ctx, sender)
    if sender == "spam@bad.example" then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "Sender refused" }
    end
  end,
  eom = function(ctx)
    ctx:add_header("X-Policy", "checked")
    return milter.accept()
  end,
}
