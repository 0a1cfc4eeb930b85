---@meta
-- luamilter editor stubs: `require "milter.net"`. Reference: docs/lua-api/net.md.

---@alias luamilter.AddressError "unbalanced-brackets"|"unterminated-quote"|"bad-source-route"|"empty-local-part"|"empty-domain"|"bad-character"

---A compiled set of IPv4/IPv6 addresses and networks, from `net.ipset`.
---@class luamilter.IpSet
local IpSet = {}

---Whether the address `ip` is in the set; nil or a string that is not an address gives false.
---@param ip string|nil
---@return boolean
function IpSet:contains(ip) end

---A parsed MAIL FROM / RCPT TO address (`local` is a Lua keyword: write `a["local"]`).
---@class luamilter.Address
---@field local string the local part, unquoted
---@field domain string|nil the domain, lowercased; nil for `<>` and `<postmaster>`
---@field address string `local@domain` re-quoted as needed; "" for the null sender

---IP sets, address parsing, PTR heuristics: pure computation, no I/O.
---@class milter.net
local net = {}

---Compiles addresses and CIDR networks into a set. A bad entry raises an error naming it.
---@param entries string[] "10.0.0.0/8", "2001:db8::/32", "192.0.2.1", ...
---@return luamilter.IpSet
function net.ipset(entries) end

---Parses an address as the MTA sends it (`<User@Example.COM>`, `<>`, source routes).
---@param text string
---@return luamilter.Address|nil address
---@return luamilter.AddressError|nil err
function net.parse_address(text) end

---Splits at the last `@`: the local part as written and the lowercased domain (nil without `@`).
---@param address string
---@return string local_part
---@return string|nil domain
function net.split(address) end

---Whether the PTR name of client `ip` looks like a dynamic address pool's; a nil `ptr` (no PTR)
---counts as dynamic. A malformed `ip` raises.
---@param ptr string|nil
---@param ip string
---@return boolean
function net.looks_dynamic(ptr, ip) end

return net
