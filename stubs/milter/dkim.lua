---@meta
-- luamilter editor stubs: `require "milter.dkim"`. Reference: docs/lua-api/dkim.md.

---@alias luamilter.DkimResultCode "pass"|"fail"|"policy"|"neutral"|"temperror"|"permerror"

---One DKIM-Signature header's verification.
---@class luamilter.DkimSignature
---@field result luamilter.DkimResultCode
---@field domain string the signing domain (d=), lower case
---@field selector string the selector (s=)
---@field algorithm string "rsa-sha256", "rsa-sha1" or "ed25519-sha256"
---@field identity string the agent or user identifier (i=), "@domain" when the signature has none
---@field reason string|nil why it did not pass

---The ARC chain's validation.
---@class luamilter.ArcResult
---@field result "none"|"pass"|"fail"
---@field sets integer how many ARC sets the chain has
---@field reason string|nil why it failed

---DKIM (RFC 6376) and ARC (RFC 8617) on the message as received, at eom only. A policy that
---requires this module while it loads (top level, a module, or setup) gets headers and body
---from the MTA; a require in a handler comes too late to ask for them.
---@class milter.dkim
local dkim = {}

---Verifies every DKIM-Signature header, in header order (an empty list when there is none).
---@param ctx luamilter.Ctx
---@return luamilter.DkimSignature[]
function dkim.verify(ctx) end

---Validates the message's ARC chain.
---@param ctx luamilter.Ctx
---@return luamilter.ArcResult
function dkim.arc(ctx) end

---ARC-seals the message with the `[dkim] keys` entry of `domain`: queues ARC-Seal,
---ARC-Message-Signature and ARC-Authentication-Results (recording `results`, an
---Authentication-Results value) at the top; cv= is the validation of the message's chain.
---@param ctx luamilter.Ctx
---@param results string "authserv-id; method=result ..."
---@param domain string
---@return true|nil ok
---@return string|nil err "no [dkim] key for example.org", "cannot seal: ...", ...
function dkim.seal(ctx, results, domain) end

---Signs the message with the `[dkim] keys` entry of `domain` (default: the From domain) and
---queues the DKIM-Signature header at the top.
---@param ctx luamilter.Ctx
---@param domain? string
---@return true|nil ok
---@return string|nil err "no [dkim] key for example.org", "no From domain", ...
function dkim.sign(ctx, domain) end

---Whether `[dkim] keys` has a key for `domain` (any stage, the top level and setup).
---@param domain string
---@return boolean
function dkim.has_key(domain) end

return dkim
