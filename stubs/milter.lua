---@meta
-- luamilter editor stubs for lua-language-server: `require "milter"`.
-- Reference: docs/lua-api/milter.md. `luamilter stubs DIR` writes this set; a test checks it
-- against the names luamilter registers (docs/editor.md).

---A duration: a number of seconds, or a string "500ms", "30s", "5m", "2h", "7d", "1w".
---@alias luamilter.Duration number|string

---@alias luamilter.VerdictKind "continue"|"accept"|"discard"|"reject"|"tempfail"

---A handler's answer, built by `milter.continue()`, `accept()`, `discard()`, `reject{}` or
---`tempfail{}`. `tostring(v)` gives the form the logs use: `reject 550 5.7.1 line / line`.
---@class luamilter.Verdict
---@field kind luamilter.VerdictKind
---@field code string|nil the reply code ("550"), nil without a reply
---@field xcode string|nil the enhanced status code ("5.7.1"), or nil
---@field text string|nil the reply lines joined by "\n", or nil

---The reply of `milter.reject{...}` and `milter.tempfail{...}`; any other field is an error.
---@class luamilter.Reply
---@field code? integer|string three digits, 5xx for reject and 4xx for tempfail (default 550 / 451)
---@field xcode? string enhanced status code of the same class, "5.7.1" (default with no code: "5.7.1" / "4.7.1")
---@field text? string|string[] a string (split into lines at "\n") or one line per item; at most 32 lines of 980 bytes
---@field immediate? boolean answer at once even when [site] delay_reject holds rejects until DATA

---The core module: verdicts, durations, sleep, log, fill, version, site facts and access map.
---@class milter
---@field version string the luamilter version, "0.1.0"
local milter = {}

---No objection: the next policy runs; if none objects, the MTA goes on (at `eom`: the message
---is accepted). Returning nil means the same.
---@return luamilter.Verdict
function milter.continue() end

---Accept without further filtering: at `connect`/`helo` the rest of the connection, from `mail`
---on the current message. No later policy runs; edits apply only when accepting at `eom`.
---@return luamilter.Verdict
function milter.accept() end

---Accept the message from the client and silently drop it (every recipient, even at `rcpt`).
---Not allowed at `connect` and `helo`.
---@return luamilter.Verdict
function milter.discard() end

---Refuse permanently (5xx): at `rcpt` the recipient, from `mail` on the message, at
---`connect`/`helo` the client's mail on this connection. Without a reply the MTA uses its own;
---a string gives `550 5.7.1 text`. A reply that breaks a rule raises an error.
---@param reply? string|luamilter.Reply
---@return luamilter.Verdict
function milter.reject(reply) end

---Refuse temporarily (4xx): the client should try again later. Same stages and replies as
---`milter.reject` (a string gives `451 4.7.1 text`).
---@param reply? string|luamilter.Reply
---@return luamilter.Verdict
function milter.tempfail(reply) end

---Seconds in a duration: a number of seconds (returned as it is) or a string with a unit
---`ms s m h d w` ("500ms", "30s", "5m", "1.5s"). A negative number or another string raises.
---@param value luamilter.Duration
---@return number seconds
function milter.duration(value) end

---Handlers only: waits without blocking other sessions. Counts against `[engine] time_limit`.
---@param duration luamilter.Duration
function milter.sleep(duration) end

---`template` with every `{key}` replaced by `tostring(values[key])` (by nothing when `values`
---has no such key); a list of lines gives a list of filled lines.
---@generic T: string|string[]
---@param template T a string, or a list of lines
---@param values? table
---@return T filled
function milter.fill(template, values) end

---Log lines at a level: `milter.log.info("mail from", sender)`; the same table as
---`require "milter.log"`.
milter.log = require "milter.log"

---The `[site]` facts; the same table as `require "milter.site"`.
milter.site = require "milter.site"

---The access map; the same table as `require "milter.access"`.
milter.access = require "milter.access"

return milter
