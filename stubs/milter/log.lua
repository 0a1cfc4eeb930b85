---@meta
-- luamilter editor stubs: `require "milter.log"`, also `milter.log`. Reference:
-- docs/lua-api/milter.md#milterlog.

---Log lines from policies (target `luamilter::policy`). The arguments are joined with spaces:
---strings as they are, other values as `tostring` shows them.
---@class milter.log
local log = {}

---Writes one line at debug level.
---@param ... any
function log.debug(...) end

---Writes one line at info level.
---@param ... any
function log.info(...) end

---Writes one line at warn level.
---@param ... any
function log.warn(...) end

---Writes one line at error level.
---@param ... any
function log.error(...) end

return log
