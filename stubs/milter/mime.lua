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

---What `mime.defang` looks for (every key optional).
---@class luamilter.DefangOptions
---@field banned_exts string[]|nil file extensions that make a part bad (default `mime.default_banned_exts()`)
---@field scan_rfc822 boolean|nil look into attached messages (default true)
---@field scan_zip boolean|nil check ZIP member names; a corrupt ZIP is bad (default true)
---@field scan_html boolean|nil cut `<script>` elements out of HTML parts (default true)
---@field notice string|nil text of the part replacing a bad one; `{name}` is its file name

---A message `mime.defang` changed.
---@class luamilter.Defanged
---@field body string the new body, for `ctx:replace_body`
---@field headers { name: string, value: string|nil }[] top-level header changes (nil value: delete)
---@field removed string[] the names of the parts replaced by the notice
---@field scripts integer how many `<script>` elements were cut

---The classic milter's 42 banned extensions (defang's default), as a new list.
---@return string[]
function mime.default_banned_exts() end

---Defangs a whole message (header block, blank line, body): `false` when nothing changes,
---the changes, or `nil, "header"|"boundary", detail` when the message cannot be read.
---@param message string
---@param opts luamilter.DefangOptions|nil
---@return luamilter.Defanged|false|nil result
---@return "header"|"boundary"|nil err
---@return string|nil detail
function mime.defang(message, opts) end

return mime
