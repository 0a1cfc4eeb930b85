---@meta
-- luamilter editor stubs: `require "milter.dmarc"`. Reference: docs/lua-api/dmarc.md.

---Which identifiers aligned with the From domain, and the record's alignment modes.
---@class luamilter.DmarcAlignment
---@field spf boolean SPF passed for an aligned domain
---@field dkim boolean a DKIM signature passed for an aligned domain
---@field aspf "r"|"s"
---@field adkim "r"|"s"

---A DMARC evaluation.
---@class luamilter.DmarcResult
---@field result "pass"|"fail"|"none"|"temperror"
---@field policy "none"|"quarantine"|"reject" the policy for this message (after t=y and pct= sampling)
---@field published "none"|"quarantine"|"reject" the record's p= (sp= for a subdomain)
---@field pct integer the record's pct= (100 when absent)
---@field sampled boolean false when the message failed outside the pct= sample (policy lowered one step)
---@field domain string the From domain ("" when DMARC does not apply)
---@field org_domain string its organizational domain (Public Suffix List)
---@field record_domain string|nil where the applied record was found
---@field alignment luamilter.DmarcAlignment
---@field rua string[] aggregate report addresses
---@field spf string|nil the SPF result used

---Inputs `check` would otherwise take from `ctx.msg`.
---@class luamilter.DmarcInputs
---@field spf? {result: string, domain: string}
---@field dkim? luamilter.DkimSignature[]
---@field sample? number the message's place in the pct= sample, in [0, 100) (default: from ctx.queue_id)

---DMARC (RFC 7489) at eom. A policy that requires this module gets headers and body.
---@class milter.dmarc
local dmarc = {}

---Evaluates DMARC for the From domain. SPF comes from `ctx.msg.spf` (the spf policy), DKIM from
---`ctx.msg.dkim`, or is verified now and kept there; `inputs` overrides both.
---@param ctx luamilter.Ctx
---@param inputs? luamilter.DmarcInputs
---@return luamilter.DmarcResult
function dmarc.check(ctx, inputs) end

---The organizational domain of `name` under the Public Suffix List ("example.co.uk" for
---"mail.example.co.uk").
---@param name string
---@return string
function dmarc.organizational_domain(name) end

return dmarc
