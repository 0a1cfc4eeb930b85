---@meta
-- luamilter editor stubs: `require "milter.mime"`. Reference: docs/lua-api/mime.md.

---One mailbox of an address-list header (`local` is a Lua keyword: write `m["local"]`).
---@class luamilter.Mailbox
---@field name string|nil the display name, decoded, or nil
---@field address string `local@domain`, the domain lowercased
---@field local string the local part without quotes
---@field domain string|nil the domain, lowercased
---@field group string|nil the group's name for a member of a group, else nil

---Header values as people read them: pure computation, no I/O.
---@class milter.mime
local mime = {}

---The header value decoded for reading: RFC 2047 encoded words decoded, folded lines joined.
---@param text string
---@return string
function mime.decode(text) end

---The mailboxes of an address-list header value (From, Sender, To, Cc, Reply-To), in order;
---`nil, "invalid"` for a value that is not an address list.
---@param text string
---@return luamilter.Mailbox[]|nil mailboxes
---@return "invalid"|nil err
function mime.addresses(text) end

return mime
