-- Test fixture: shows facts other policies published, as headers the case files can check:
-- X-Listed (ctx.msg.listed from the whitelist policy, or "none").
return {
  description = "add X-Listed with ctx.msg.listed",
  eom = function(ctx)
    ctx:add_header("X-Listed", ctx.msg.listed or "none")
  end,
}
