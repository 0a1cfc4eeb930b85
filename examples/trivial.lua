-- trivial.lua: logs every stage and adds a header to every message.
-- The smallest complete policy: a table of handlers named after the milter stages.
local milter = require "milter"
local log = milter.log

return {
  description = "log every stage, add X-Luamilter to every message",
  options = { header = "X-Luamilter", value = "checked" },

  connect = function(ctx, hostname, ip) log.info("connect from", hostname, ip) end,
  helo    = function(ctx, name) log.info("helo", name) end,
  mail    = function(ctx, sender, args) log.info("mail from", "<" .. sender .. ">") end,
  rcpt    = function(ctx, rcpt, args) log.info("rcpt to", "<" .. rcpt .. ">") end,
  data    = function(ctx) log.info("data") end,
  header  = function(ctx, name, value) log.debug("header", name) end,
  eoh     = function(ctx) log.info("end of headers:", #ctx.headers, "headers") end,
  body    = function(ctx, chunk) log.debug("body chunk of", #chunk, "bytes") end,
  eom     = function(ctx, opts)
    ctx:add_header(opts.header, opts.value)
    log.info("end of message for", #ctx.recipients, "recipient(s)")
    return milter.accept()
  end,
  abort   = function(ctx) log.info("abort") end,
  close   = function(ctx) log.info("close") end,
  unknown = function(ctx, line) log.info("unknown command", line) end,
}
