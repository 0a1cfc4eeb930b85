---@meta
-- luamilter editor stubs: `require "milter.archive"`. Reference: docs/lua-api/archive.md.

---The Maildir archive of `[archive] maildir`: a writer thread behind a bounded queue.
---@class milter.archive
local archive = {}

---Hands a whole message (header block, blank line, body) to the writer without waiting:
---`true`, or `false, "off"` (no `[archive] maildir`) or `false, "full"` (queue full: lost, counted).
---@param message string
---@return boolean queued
---@return "off"|"full"|nil err
function archive.save(message) end

---Messages lost since the daemon started (queue full, or the disk refused a write).
---@return integer
function archive.lost() end

return archive
