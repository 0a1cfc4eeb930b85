-- lib/notice: telling the sender. Warning DSNs from the message templates, quarantine with a
-- notice, and the recipients' NOTIFY (RFC 3461) that decides whether a DSN may be sent.
--
-- Shared by the stock policies (cbv sends its DSNs with it; a honeypot or content screener
-- quarantines with it); site policies may use it too:
--   local notice = require "lib.notice"
-- Documented in docs/policies/lib/notice.md.
local milter = require "milter"
local smtp = require "milter.smtp"
local site = require "milter.site"
local store = require "milter.store"
local replies = require "lib.replies"

local M = {}

-- The options `send` and `quarantine` take, with their defaults.
M.defaults = {
  dsn_rate = 10,          -- DSNs to one domain per dsn_window at most (0: no limit)
  dsn_window = "1h",
  dsn_remember = "7d",    -- a sender sent a DSN is not sent another for this long
  timeout = nil,          -- the submission's deadline; nil: [smtp] timeout
}

local function option(opts, key)
  local value = opts and opts[key]
  if value == nil then return M.defaults[key] end
  return value
end

local NOTIFY_WORDS = { SUCCESS = true, FAILURE = true, DELAY = true }

-- The words of a NOTIFY value (RFC 3461) as a set, empty for NEVER; nil when a word is not
-- SUCCESS, FAILURE or DELAY (or NEVER alone).
function M.notify_words(value)
  local upper = value:upper()
  if upper == "NEVER" then return {} end
  local set = {}
  for word in (upper .. ","):gmatch("([^,]*),") do
    if not NOTIFY_WORDS[word] then return nil end
    set[word] = true
  end
  return set
end

-- The NOTIFY keywords of one recipient's ESMTP parameters, as a set: RFC 3461's default
-- (no NOTIFY, or one the recipients policy would refuse) is FAILURE,DELAY, as the classic
-- milter read it; NOTIFY=NEVER is the empty set.
function M.notify(args)
  for _, arg in ipairs(args or {}) do
    local value = arg:match("^[Nn][Oo][Tt][Ii][Ff][Yy]=(.*)$")
    if value then return M.notify_words(value) or { FAILURE = true, DELAY = true } end
  end
  return { FAILURE = true, DELAY = true }
end

-- The recipients whose NOTIFY allows a notice: `want` = "DELAY" (a warning DSN) or "any" (a
-- quarantine notice: any NOTIFY but NEVER).
function M.recipients(ctx, want)
  local out = {}
  local args = ctx.recipient_args
  for i, rcpt in ipairs(ctx.recipients) do
    local set = M.notify(args[i])
    if (want == "any" and next(set) ~= nil) or set[want] then out[#out + 1] = rcpt end
  end
  return out
end

-- The header of the message named `name` (first one), or "".
local function header(ctx, name)
  for _, h in ipairs(ctx.headers) do
    if h.name:lower() == name then return h.value end
  end
  return ""
end

-- The template's own header lines (`Subject: …`) up to the first blank line, and its body.
local function split(text)
  local head, body = text:match("^(.-)\r?\n\r?\n(.*)$")
  if not head or not head:match("^[%w-]+:") then return {}, text end
  local fields = {}
  for line in head:gmatch("[^\r\n]+") do
    local name, value = line:match("^([%w-]+):%s*(.-)%s*$")
    if name then fields[name:lower()] = value end
  end
  return fields, body
end

-- The values a template may name: {sender}, {receiver}, {heloname}, {connectip},
-- {sender_domain}, {result}, {perm_error}, {rcpt}, {subject}, {spf_result}, {reason}.
local function values(ctx, target, recipients, extra)
  local spf = type(ctx.msg.spf) == "table" and ctx.msg.spf or {}
  local out = {
    sender = target, receiver = ctx.receiver, heloname = ctx.helo or "",
    connectip = ctx.client.ip or "", sender_domain = target:match("@([^@]+)$") or "",
    result = spf.effective or "", perm_error = spf.explanation or "",
    rcpt = table.concat(recipients, "\t"), subject = header(ctx, "subject"),
    spf_result = spf.received_spf or "",
  }
  for k, v in pairs(extra or {}) do out[k] = v end
  return out
end

-- Sends `target` (default: the sender) a DSN from template `template` about the recipients
-- whose NOTIFY allows it (`opts.notify`: "DELAY", the default, or "any"), at eom.
-- Returns true, or nil and why: "notemplate", "notify" (no recipient allows it), "remembered"
-- (sent one within dsn_remember), "limited" (dsn_rate), "invalid", or milter.smtp.send's error
-- (with the relay's reply for "rejected" as the third value).
function M.send(ctx, template, opts)
  opts = opts or {}
  local target = opts.target or ctx.sender or ""
  local domain = target:match("@([^@]+)$")
  if not domain then return nil, "invalid" end
  local text = site.template(template)
  if not text then return nil, "notemplate" end
  local recipients = M.recipients(ctx, opts.notify or "DELAY")
  if #recipients == 0 then return nil, "notify" end
  local key = target:lower()
  if store.get("notice:sent:" .. key) then return nil, "remembered" end
  local rate = option(opts, "dsn_rate")
  if rate > 0 then
    local n = store.count("notice:rate:" .. domain:lower(), option(opts, "dsn_window"))
    if n and n > rate then return nil, "limited" end
  end
  local fields, body = split(text)
  local filled = values(ctx, target, recipients, opts.values)
  local sent, err, reply = smtp.send({
    to = target,
    reporting = ctx.receiver,
    subject = fields.subject and milter.fill(fields.subject, filled) or nil,
    text = milter.fill(body, filled),
    recipients = recipients,
    action = "delayed",
    status = opts.status or "4.7.0",
    headers = ctx.headers,
  }, { timeout = option(opts, "timeout") })
  if sent then store.set("notice:sent:" .. key, template, option(opts, "dsn_remember")) end
  return sent, err, reply
end

-- Puts the message in quarantine (ctx:quarantine(reason)) and tells the sender, as the classic
-- milter did for honeypot and screened mail: a sender whose SPF passed (ctx.msg.spf) gets the
-- `quarantine` DSN when a recipient's NOTIFY is not NEVER; any other sender is called back,
-- and one whose exchanger refuses it permanently is refused (550 5.7.1, the dsnrefused reply).
-- Call it at eom; returns that verdict or nil. The null sender gets no notice.
function M.quarantine(ctx, reason, opts)
  opts = opts or {}
  ctx:quarantine(reason)
  local sender = ctx.sender or ""
  if sender == "" then return nil end
  local spf = type(ctx.msg.spf) == "table" and ctx.msg.spf or {}
  if spf.effective == "pass" then
    local sent, err = M.send(ctx, opts.template or "quarantine",
      { notify = "any", values = { reason = reason }, status = "4.7.0",
        dsn_rate = opts.dsn_rate, dsn_window = opts.dsn_window,
        dsn_remember = opts.dsn_remember, timeout = opts.timeout })
    milter.log.info("DSN: quarantine notice to " .. sender .. ": "
      .. (sent and "sent" or tostring(err)))
    return nil
  end
  local result, err = smtp.verify(sender, { timeout = opts.timeout })
  if type(result) == "table" and result.permanent then
    local text = result.code .. " " .. result.text
    milter.log.info("CBV: " .. text .. " (" .. sender .. "): REJECT (quarantined: " .. reason .. ")")
    return milter.reject{ code = 550, xcode = "5.7.1",
      text = replies.lines("dsnrefused", { { "mfrom", sender }, { "msg", text } },
        "CBV: " .. text) }
  end
  milter.log.info("CBV: " .. sender .. " " .. (result == "ok" and "ok" or tostring(err or
    (type(result) == "table" and result.code))) .. " (quarantined: " .. reason .. ")")
  return nil
end

return M
