---@meta
-- luamilter editor stubs: `require "milter.smtp"`. Reference: docs/lua-api/smtp.md.

---Why a call-back has no SMTP answer: the second value when `verify` returned nil.
---@alias luamilter.SmtpError "invalid"|"nomx"|"dns"|"timeout"|"refused"|"closed"|"tls"|"limited"

---A refusal by the sender's mail exchanger.
---@class luamilter.SmtpReply
---@field code integer 550, 451, ...
---@field text string the reply text, enhanced status code first ("5.1.1 User unknown")
---@field permanent boolean true for a 5xx reply
---@field stage "connect"|"helo"|"mail"|"rcpt"|"data" the command that was refused

---Options of `smtp.verify`.
---@class luamilter.VerifyOptions
---@field timeout? string|number the whole call-back's deadline (default `[smtp] timeout`)
---@field cache? boolean read and write the result cache (default true)

---A DSN for `smtp.send` (RFC 3464 multipart/report).
---@class luamilter.Dsn
---@field to string the DSN's recipient, usually `ctx.sender`
---@field reporting? string the reporting MTA (default `[smtp] helo`); usually `ctx.receiver`
---@field subject? string default "Delivery Status Notification (Failure|Delay|Success)"
---@field text? string the human-readable part
---@field recipients? string[] the original recipients reported on (default `{ to }`)
---@field action? "failed"|"delayed"|"delivered"|"relayed"|"expanded" default "failed"
---@field status? string enhanced status code, "5.7.1" (default by action)
---@field diagnostic? string the `Diagnostic-Code: smtp;` text
---@field headers? {name: string, value: string}[] the original header (`ctx.headers`)
---@field token? string an address (SRS address of `to`) used as Message-ID and in X-Mailer

---Options of `smtp.send`.
---@class luamilter.SendOptions
---@field timeout? string|number the whole submission's deadline (default `[smtp] timeout`)

---Outbound SMTP call-backs and DSNs that suspend only the calling session.
---@class milter.smtp
local smtp = {}

---Asks `address`'s mail exchanger (MX, else the domain's A/AAAA) whether it takes mail for
---it: EHLO, STARTTLS when offered, `MAIL FROM:<>`, `RCPT TO:<address>`, QUIT. Returns "ok",
---a refusal table, or nil and why. Accepted and permanently refused addresses are remembered.
---@param address string
---@param opts? luamilter.VerifyOptions
---@return "ok"|luamilter.SmtpReply|nil result
---@return luamilter.SmtpError|nil err
function smtp.verify(address, opts) end

---The remembered answer of an earlier call-back to `address`, without calling back: "ok", a
---permanent refusal, or nil when nothing is remembered (nil, "invalid" for a malformed address).
---@param address string
---@return "ok"|luamilter.SmtpReply|nil result
---@return "invalid"|nil err
function smtp.cached(address) end

---Sends a DSN (RFC 3464) through `[smtp] relay`: MAIL FROM:<> (from postmaster@reporting when
---the relay refuses that), RCPT TO:<to>, DATA. Returns true, or nil and why; with "rejected",
---the relay's reply third.
---@param dsn luamilter.Dsn
---@param opts? luamilter.SendOptions
---@return true|nil sent
---@return luamilter.SmtpError|"rejected"|nil err
---@return luamilter.SmtpReply|nil reply
function smtp.send(dsn, opts) end

return smtp
