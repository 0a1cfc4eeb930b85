-- Test fixture: queues a call-back (ctx.msg.cbv = "CBV") for senders whose local part starts
-- with "queue-", as a site policy would; runs before spf and cbv.
return {
  description = "queue a call-back for queue-* senders",
  mail = function(ctx, sender)
    if sender:match("^queue%-") then ctx.msg.cbv = "CBV" end
  end,
}
