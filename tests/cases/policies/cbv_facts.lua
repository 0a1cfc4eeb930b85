-- Test fixture: shows what the cbv policy saw and did, as X-Cbv (runs after cbv).
return {
  description = "add X-Cbv with the call-back facts",
  eom = function(ctx)
    local dsn = ctx.msg.dsn
    ctx:add_header("X-Cbv", table.concat({
      "need=" .. tostring(ctx.msg.cbv), "template=" .. tostring(ctx.msg.cbv_template),
      "target=" .. tostring(ctx.msg.cbv_target), "result=" .. tostring(ctx.msg.cbv_result),
      "dsn=" .. (dsn and (tostring(dsn.template) .. ">" .. dsn.target .. ":"
        .. (dsn.sent and "sent" or tostring(dsn.error))) or "nil"),
      "demerits=" .. ctx.demerits,
    }, " "))
  end,
}
