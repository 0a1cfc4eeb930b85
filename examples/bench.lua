-- The trivial benchmark policy (benches/compare.sh; BENCHMARKS.md): reject the
-- sender spam@bad.example at MAIL, add a header at end of message, accept.
-- examples/native_baseline.rs does the same in plain Rust.
local milter = require "milter"

return {
  name = "bench",
  mail = function(ctx, sender, esmtp_args, opts)
    if sender == "spam@bad.example" then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "Go away" }
    end
  end,
  eom = function(ctx, opts)
    ctx:add_header("X-Policy", "checked")
    return milter.accept()
  end,
}
