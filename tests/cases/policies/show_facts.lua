-- Test fixture: shows facts other policies published, as headers the case files can check:
-- X-Listed (ctx.msg.listed from the whitelist policy, or "none"); X-Notify (ctx.msg.notify
-- from the recipients policy, when set: "rcpt=WORDS" per recipient, NEVER for none).
local function notify_text(notify)
  local out = {}
  for rcpt, words in pairs(notify) do
    local list = {}
    for word in pairs(words) do list[#list + 1] = word end
    table.sort(list)
    out[#out + 1] = rcpt .. "=" .. (#list > 0 and table.concat(list, ",") or "NEVER")
  end
  table.sort(out)
  return table.concat(out, " ")
end

return {
  description = "add X-Listed with ctx.msg.listed, X-Notify with ctx.msg.notify",
  eom = function(ctx)
    ctx:add_header("X-Listed", ctx.msg.listed or "none")
    if ctx.msg.notify then ctx:add_header("X-Notify", notify_text(ctx.msg.notify)) end
  end,
}
