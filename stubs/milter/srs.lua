---@meta
-- luamilter editor stubs: `require "milter.srs"`. Reference: docs/lua-api/srs.md.

---@alias luamilter.SrsError "not-signed"|"no-domain"|"malformed"|"bad-timestamp"|"expired"|"bad-hash"

---Options of `srs.new`.
---@class luamilter.SrsOptions
---@field secrets string[] the first signs, every one verifies (rotate by putting the new one first)
---@field max_age? integer seconds a signature stays valid, whole days (default 21 days)
---@field hash_length? integer base64 characters of SRS hash (4 to 27, default 4)

---Signs and verifies envelope senders with a list of secrets, from `srs.new`.
---@class luamilter.SrsSigner
local SrsSigner = {}

---The SRS address of `sender` under domain `alias` (SRS0, or SRS1 for another forwarder's SRS
---address); a sender already in `alias` comes back as it is.
---@param sender string
---@param alias string a domain
---@return string|nil address
---@return luamilter.SrsError|nil err
function SrsSigner:forward(sender, alias) end

---The address an SRS address of ours was made from (SRS1 gives the first hop's SRS0 address).
---@param address string
---@return string|nil original
---@return luamilter.SrsError|nil err
function SrsSigner:reverse(address) end

---The BATV `prvs=` address of `mailbox`, valid for the maximum age.
---@param mailbox string
---@return string|nil address
---@return luamilter.SrsError|nil err
function SrsSigner:sign(mailbox) end

---The mailbox of a BATV `prvs=` address of ours that has not expired.
---@param address string
---@return string|nil mailbox
---@return luamilter.SrsError|nil err
function SrsSigner:verify(address) end

---SRS (Sender Rewriting Scheme) and BATV signed envelope senders.
---@class milter.srs
local srs = {}

---A signer; bad options (no secret, an age outside 1 to 1023 days) raise an error.
---@param options luamilter.SrsOptions
---@return luamilter.SrsSigner
function srs.new(options) end

---The site's signer (`[srs]` secrets) and the domain of its SRS addresses (`[srs] domain`, else
---`[site] hostname`); nil when `[srs]` has no secrets.
---@return luamilter.SrsSigner|nil signer
---@return string|nil domain
function srs.site() end

---Whether the local part of `address` starts with SRS0 or SRS1 and a separator (any case).
---@param address string
---@return boolean
function srs.is_srs(address) end

---Whether `address` is a BATV `prvs=` address.
---@param address string
---@return boolean
function srs.is_batv(address) end

return srs
