---@meta
-- luamilter editor stubs: `require "milter.access"`, also `milter.access`. Reference:
-- docs/site.md#the-access-map.

---Lookups in the sendmail-style access map (`[site] access_file`, `[site.access]`).
---@class milter.access
local access = {}

---The value of the first entry found for `tag:identity`, `tag:domain`, `tag:.parent`...,
---`tag:`, `tag` ("OK", "REJECT", "WHITELIST", ...), or nil.
---@param tag string "SPF-Neutral", "SMTP-Auth", ...
---@param identity string an address or a domain
---@return string|nil value
function access.lookup(tag, identity) end

return access
