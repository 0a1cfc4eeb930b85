---@meta
-- luamilter editor stubs: `ctx`, the first argument of every handler (not a module: nothing
-- requires it). Reference: docs/lua-api/ctx.md. Annotate a handler's first parameter with
-- `---@param ctx luamilter.Ctx` (docs/editor.md).

---A header as the MTA sent it.
---@class luamilter.Header
---@field name string
---@field value string

---A final verdict given for the current message (`ctx.verdicts`).
---@class luamilter.GivenVerdict
---@field stage luamilter.Stage the stage it answered
---@field policy string the policy that gave it, "(earlier stage)" for an owed or delayed one
---@field action "accept"|"reject"|"tempfail"|"discard"|"fault"
---@field verdict string the verdict with its reply, "reject 550 5.7.1 Go away"

---The connecting client (`ctx.client`), fixed for the connection. Any other field raises.
---@class luamilter.Client
---@field hostname string the host name as the MTA resolved it, "[192.0.2.1]" when it has none
---@field ip string|nil the IP address, nil for a non-IP client
---@field port integer|nil the client's TCP port, or nil
---@field family "inet"|"inet6"|"unix"|"unknown"
---@field path string|nil the socket path of a "unix" client, else nil
---@field internal boolean in `[site] internal_networks`, or authenticated (from `mail` on)
---@field trusted boolean in `[site] trusted_relays`
---@field localhost boolean 127.0.0.0/8 or ::1
---@field authenticated boolean authenticated with SMTP AUTH (known from `mail` on)
---@field ptr string|nil the MTA's verified client name, or nil
---@field dynamic boolean no verified name, or one that looks like a dynamic pool's

---The session: what the MTA has told luamilter so far, the policies' own tables, and the
---edits queued for the end of the message. Fields are read-only; reading a field or calling a
---method that does not exist raises `ctx has no field or method 'x'`.
---@class luamilter.Ctx
---@field stage luamilter.Stage the current stage
---@field client luamilter.Client the client
---@field helo string|nil the HELO/EHLO argument, nil before HELO
---@field sender string|nil MAIL FROM without `<>`, "" for the null sender; nil before the first MAIL
---@field sender_args string[] MAIL FROM ESMTP parameters, { "SIZE=1234", "BODY=8BITMIME" }
---@field recipients string[] the recipients accepted so far, without `<>`, in RCPT order
---@field recipient_args string[][] the ESMTP parameters of each of `recipients`, same order, { { "NOTIFY=DELAY" }, {} }
---@field headers luamilter.Header[] the headers in message order (`header`, `eoh`, `body`, `eom` only; raises when the MTA does not send headers: `needs = { "headers" }`)
---@field queue_id string|nil the MTA's queue ID (macro i), nil while unknown
---@field auth string|nil the SMTP AUTH login name (macro {auth_authen}), or nil
---@field receiver string this receiver's name: `[site] hostname`, else macro j, else the host name
---@field demerits integer offences counted on this connection so far
---@field delayed luamilter.Verdict|nil the reject held back by `[site] delay_reject` until DATA, or nil
---@field verdicts luamilter.GivenVerdict[] the final verdicts given so far for the current message, in order
---@field vars table this policy's own table for the connection
---@field msg table the chain's shared table for the current message
local Ctx = {}

---All stages. Adds `n` (default 1) offences to the connection's count, logs a `demerit` line,
---and returns the new count.
---@param n? integer
---@param reason? string
---@return integer demerits
function Ctx:demerit(n, reason) end

---All stages. The value of an MTA macro, with or without braces ("{daemon_port}",
---"daemon_port", "j"), or nil when the MTA has not sent it.
---@param name string
---@return string|nil value
function Ctx:macro(name) end

---The value of the `n`-th header (default 1) called `name`, case-insensitive, or nil.
---@param name string
---@param n? integer
---@return string|nil value
function Ctx:header(name, n) end

---Message stages. Appends a header at the end of the header block.
---@param name string
---@param value string
function Ctx:add_header(name, value) end

---Message stages. Inserts a header at position `index` among all headers, 0 being the top.
---@param index integer
---@param name string
---@param value string
function Ctx:insert_header(index, name, value) end

---Message stages. Replaces the value of the `index`-th (from 1) header called `name`; a nil
---`value` deletes it.
---@param name string
---@param index integer
---@param value string|nil
function Ctx:change_header(name, index, value) end

---Message stages. Deletes the `index`-th header called `name` (default 1).
---@param name string
---@param index? integer
function Ctx:delete_header(name, index) end

---Message stages. Adds an envelope recipient, with optional ESMTP arguments.
---@param address string
---@param esmtp_args? string|string[] "NOTIFY=NEVER" or a list of such strings
function Ctx:add_rcpt(address, esmtp_args) end

---Message stages. Removes an envelope recipient, given as the MTA sent it.
---@param address string
function Ctx:delete_rcpt(address) end

---Message stages. Replaces the envelope sender, with optional ESMTP arguments.
---@param address string
---@param esmtp_args? string|string[]
function Ctx:change_sender(address, esmtp_args) end

---Message stages. Replaces the body (CRLF line ends); several calls append.
---@param bytes string
function Ctx:replace_body(bytes) end

---Message stages. Asks the MTA to hold the message (Postfix: the hold queue).
---@param reason string
function Ctx:quarantine(reason) end

---`eom` only. Tells the MTA that luamilter is still working (restarts the MTA's timeout).
function Ctx:progress() end
