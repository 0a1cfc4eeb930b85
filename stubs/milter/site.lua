---@meta
-- luamilter editor stubs: `require "milter.site"`, also `milter.site`. Reference: docs/site.md.

---Why `read_list` returned nil.
---@alias luamilter.ListFileError "missing"|"unreadable"|"outside"

---The generation's `[site]` facts, read-only.
---@class milter.site
---@field hostname string this receiver's name: `[site] hostname`, else the system host name
---@field delay_reject boolean `[site] delay_reject`: rejects at connect, HELO and MAIL are held until DATA
---@field errors_url string|false `[site] errors_url` without a trailing `/`: the base of templated replies; false when unset
local site = {}

---Whether `ip` is in `[site] internal_networks`. A string that is not an address raises.
---@param ip string
---@return boolean
function site.internal(ip) end

---Whether `ip` is in `[site] trusted_relays`. A string that is not an address raises.
---@param ip string
---@return boolean
function site.trusted(ip) end

---Whether `ip` is in `[site] internal_mtas`. A string that is not an address raises.
---@param ip string
---@return boolean
function site.internal_mta(ip) end

---`[site] internal_domains`, lowercased, as a new list ("*.example.org" entries included).
---@return string[]
function site.internal_domains() end

---Whether `domain` is one of `[site] internal_domains` ("*.example.org" covers subdomains).
---@param domain string
---@return boolean
function site.internal_domain(domain) end

---Whether `name` is in `[site] hello_blacklist`.
---@param name string
---@return boolean
function site.hello_blacklisted(name) end

---Handlers only (waits without blocking other sessions). The entries of a list file (one per line; blank lines and `#`
---comments skipped), relative to the config file's directory; only files in that directory or
---a policy directory are read.
---@param path string
---@return string[]|nil entries
---@return luamilter.ListFileError|nil err
function site.read_list(path) end

---Handlers only. The text of message template `name` (`"neutral"`): `templates/<name>.txt` in
---the first policy directory that has it, else the stock one; nil when there is none.
---@param name string
---@return string|nil text
function site.template(name) end

return site
