---@meta
-- luamilter editor stubs: `require "milter.dns"`. Reference: docs/lua-api/dns.md.

---Why a lookup failed: the second value of a function that returned nil.
---@alias luamilter.DnsError "nxdomain"|"nodata"|"servfail"|"refused"|"timeout"|"error"

---@class luamilter.Mx
---@field preference integer
---@field exchange string

---A DNS list entry: the A records of the listing and its TXT record.
---@class luamilter.Listing
---@field codes string[] "127.0.0.2", ...
---@field reason string|nil the TXT record, nil when the list publishes none

---One query of `dns.lists`: a `zone` and either an `ip` or a `domain`.
---@class luamilter.ListQuery
---@field zone string
---@field ip? string an IP list query, as `dns.dnsbl`
---@field domain? string a domain list query, as `dns.rhsbl`

---One answer of `dns.lists`: `{ listed = true, codes = {...}, reason = ... }`,
---`{ listed = false }` or `{ error = "timeout" }`.
---@class luamilter.ListAnswer
---@field listed boolean|nil
---@field codes string[]|nil
---@field reason string|nil
---@field error luamilter.DnsError|nil

---DNS lookups that suspend only the calling session. An expected failure returns
---`nil, err`; a malformed IP argument raises.
---@class milter.dns
local dns = {}

---IPv4 addresses of `name` (CNAMEs followed).
---@param name string
---@return string[]|nil addrs
---@return luamilter.DnsError|nil err
function dns.a(name) end

---IPv6 addresses of `name`.
---@param name string
---@return string[]|nil addrs
---@return luamilter.DnsError|nil err
function dns.aaaa(name) end

---Mail exchangers of `name`, lowest preference first.
---@param name string
---@return luamilter.Mx[]|nil mxs
---@return luamilter.DnsError|nil err
function dns.mx(name) end

---TXT records of `name`, one string per record (a record's strings joined).
---@param name string
---@return string[]|nil records
---@return luamilter.DnsError|nil err
function dns.txt(name) end

---Reverse DNS names of the address `ip` (not verified; see `dns.fcrdns`).
---@param ip string
---@return string[]|nil names
---@return luamilter.DnsError|nil err
function dns.ptr(ip) end

---Nameservers of `name`.
---@param name string
---@return string[]|nil names
---@return luamilter.DnsError|nil err
function dns.ns(name) end

---Forward-confirmed reverse DNS: the PTR names of `ip` whose A/AAAA records include `ip`. An
---empty list: PTR names, none confirmed.
---@param ip string
---@return string[]|nil names
---@return luamilter.DnsError|nil err
function dns.fcrdns(ip) end

---Looks `ip` up in the DNS blocklist `zone`: the listing, `false` when not listed, or
---`nil, err`.
---@param ip string
---@param zone string
---@return luamilter.Listing|false|nil listing
---@return luamilter.DnsError|nil err
function dns.dnsbl(ip, zone) end

---Looks `domain` up in the domain blocklist `zone` (queries `domain.zone`); returns as
---`dns.dnsbl`.
---@param domain string
---@param zone string
---@return luamilter.Listing|false|nil listing
---@return luamilter.DnsError|nil err
function dns.rhsbl(domain, zone) end

---Runs up to 64 DNS list queries at the same time; one answer per query, in order. A malformed
---query raises.
---@param queries luamilter.ListQuery[]
---@return luamilter.ListAnswer[] answers
function dns.lists(queries) end

return dns
