-- archive: every message that reaches this policy's end of message goes to the [archive]
-- Maildir, as the MTA sent it (stock pack; the classic milter's [wiretap] archive). Saving never
-- waits: the archive service's writer thread does the disk work behind a bounded queue, and a
-- full queue or a full disk loses the copy (counted, logged), never the message.
-- Put it last in the chain: policies after it may still refuse a message it kept.
local milter = require "milter"
local archive = require "milter.archive"
local message = require "lib.message"

-- Warned that no maildir is configured (once per Lua state).
local warned = false

return {
  description = "keep a copy of every accepted message in the [archive] Maildir",
  noreply = { "body" },
  options = { max_size = 50 * 1024 * 1024 },

  body = function(ctx, chunk, opts) message.collect(ctx, chunk, "archive", opts.max_size) end,

  eom = function(ctx, opts)
    local text = message.text_for(ctx, "archive")
    if not text then return end
    local queued, err = archive.save(text)
    if not queued and err == "off" and not warned then
      warned = true
      milter.log.warn("archive: no [archive] maildir is configured; nothing is archived")
    end
  end,
}
