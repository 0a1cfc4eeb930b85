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

---Keeps a copy of a message (one a policy changed or could not read: `"defang"`, `"fail"`,
---`"dsn"`) in the Maildir of `[site] save_dir`, marked `X-Luamilter-Kept: <kind>`, without
---waiting: `true`, or `false, "off"` (no save_dir) or `false, "full"`. A bad kind raises.
---@param kind string 1 to 32 letters, digits, `-` or `_`
---@param message string
---@return boolean queued
---@return "off"|"full"|nil err
function archive.keep(kind, message) end

---Messages lost since the daemon started (queue full, or the disk refused a write).
---@return integer
function archive.lost() end

return archive
