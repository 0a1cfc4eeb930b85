---@meta
-- luamilter editor stubs: `require "milter.spf"`. Reference: docs/lua-api/spf.md.

---@alias luamilter.SpfResultCode "pass"|"fail"|"softfail"|"neutral"|"none"|"temperror"|"permerror"

---What every SPF check returns (DNS problems are the result "temperror", not errors).
---@class luamilter.SpfResult
---@field result luamilter.SpfResultCode
---@field explanation string the domain's explanation for a fail with exp=, else why
---@field mechanism string|nil the mechanism that matched ("ip4:192.0.2.0/24", "mx", "all"), or nil
---@field received_spf string a ready Received-SPF header value, without the field name
---@field guessed boolean the result came from the best-guess record (only `best_guess`)

---Sender Policy Framework checks (RFC 7208) over the daemon's resolver; they suspend only the
---calling session. A malformed `ip` raises.
---@class milter.spf
local spf = {}

---Checks the MAIL FROM identity. The null sender (`<>`, "" or nil) is checked as
---postmaster@`helo`.
---@param ip string the client address
---@param sender string|nil the envelope sender, in any form the MTA gives
---@param helo string|nil the HELO/EHLO name
---@return luamilter.SpfResult
function spf.check_host(ip, sender, helo) end

---Checks the HELO identity: the SPF record of the HELO name itself.
---@param ip string
---@param helo string|nil
---@return luamilter.SpfResult
function spf.check_helo(ip, helo) end

---Like `check_host`, but a domain without SPF record gets the guess record (`[spf] best_guess`,
---or `record`) evaluated, with `guessed` true. An invalid `record` raises.
---@param ip string
---@param sender string|nil
---@param helo string|nil
---@param record? string a guess record for this call, "v=spf1 a/24 mx/24 ?all"
---@return luamilter.SpfResult
function spf.best_guess(ip, sender, helo, record) end

return spf
