-- recipients: who may receive mail here (stock pack; the classic milter's RCPT checks).
--
-- RCPT: the ESMTP parameters are parsed; a malformed one, or a NOTIFY other than NEVER or a
-- list of SUCCESS, FAILURE and DELAY, is refused ("Invalid RCPT PARAM"); what the recipient
-- asked to be notified of is published in ctx.msg.notify[rcpt] (FAILURE,DELAY by default).
-- For a domain of check_user, a local part that is not listed (any case) is refused and costs
-- demerits, unless the srs policy verified the recipient as a signed bounce address.
-- A recipient in block_forward marks the message; its Subject, if it starts like an unedited
-- forward ("Fwd:", "[Fw"), is refused at the header stage (external clients, messages not
-- whitelisted).
-- Lists (check_user, block_forward) hold "user@domain" entries, or "file:PATH" naming a list
-- file of the local parts of one domain, the file's name (as the classic milter's addrsets).
local milter = require "milter"
local site = require "milter.site"
local net = require "milter.net"
local mime = require "milter.mime"
local notice = require "lib.notice"

local fill = milter.fill

-- The compiled address sets of each options table: option → domain → set of local parts.
local compiled = setmetatable({}, { __mode = "k" })

local function address_set(opts, option)
  local sets = compiled[opts]
  if not sets then
    sets = {}
    compiled[opts] = sets
  end
  local set = sets[option]
  if set then return set end
  set = {}
  local function add(domain, user)
    domain = domain:lower()
    set[domain] = set[domain] or {}
    if user then set[domain][user:lower()] = true end
  end
  for _, entry in ipairs(opts[option]) do
    local path = entry:match("^file:(.+)$")
    if path then
      local domain = path:match("([^/]+)$")
      local users, err = site.read_list(path)
      if not users then
        error(("recipients: %s: cannot read %s (%s)"):format(option, path, err), 0)
      end
      add(domain)
      for _, user in ipairs(users) do add(domain, user) end
    else
      local user, domain = net.split(entry)
      if not domain then
        error(("recipients: %s: %q is not user@domain or file:PATH"):format(option, entry), 0)
      end
      add(domain, user)
    end
  end
  sets[option] = set
  return set
end

-- The users of `domain` in the set (nil when the set does not cover the domain).
local function users_of(set, domain)
  return domain and set[domain] or nil
end

-- The NOTIFY request of RCPT parameters (`args`: name → value, or true without a value): a
-- set of words, empty for NEVER; or nil and the offending parameter when one is malformed
-- (RFC 5321 esmtp-keyword, esmtp-value: printable ASCII but "=").
local function parse_params(args)
  local notify = { FAILURE = true, DELAY = true }
  for key, value in pairs(args) do
    if not key:match("^[%w][%w-]*$") or (value ~= true and not value:match("^[!-<>-~]+$")) then
      return nil, key .. (value == true and "" or "=" .. value)
    end
    if key == "NOTIFY" then
      if value == true then return nil, key end
      notify = notice.notify_words(value)
      if not notify then return nil, key .. "=" .. value end
    end
  end
  return notify
end

local function refuse(text, values, code, xcode)
  return milter.reject{ code = code or 550, xcode = xcode or "5.7.1", text = fill(text, values or {}) }
end

return {
  description = "valid RCPT parameters (NOTIFY), known users per domain, no unedited forwards for those who hate them",
  noreply = { "header" },
  options = {
    check_user = {},
    unknown_user_demerits = 1,
    unknown_user_reply = "No such user here",
    params_reply = "Invalid RCPT PARAM",
    block_forward = {},
    forward_prefixes = { "fwd:", "[fw" },
    forward_reply = "I find unedited forwards annoying",
  },

  rcpt = function(ctx, rcpt, args, opts)
    local notify, bad = parse_params(args)
    if not notify then
      milter.log.info("recipients: REJECT bad RCPT parameter", bad, "for", rcpt)
      return refuse(opts.params_reply)
    end
    ctx.msg.notify = ctx.msg.notify or {}
    ctx.msg.notify[rcpt] = notify

    local a = net.parse_address(rcpt)
    local user, domain = a and a["local"], a and a.domain
    local known = users_of(address_set(opts, "check_user"), domain)
    local signed = ctx.msg.signed and ctx.msg.signed[rcpt]
    if known and not known[user:lower()] and not signed then
      ctx:demerit(opts.unknown_user_demerits, "unknown user " .. rcpt)
      milter.log.info("recipients: REJECT unknown user", rcpt)
      return refuse(opts.unknown_user_reply, { rcpt = rcpt }, 550, "5.1.1")
    end
    local haters = users_of(address_set(opts, "block_forward"), domain)
    if haters and haters[user:lower()] then ctx.msg.block_forward = true end
  end,

  header = function(ctx, name, value, opts)
    if not ctx.msg.block_forward or name:lower() ~= "subject" then return end
    if ctx.client.internal or ctx.msg.listed == "WHITELIST" then return end
    local subject = mime.decode(value):lower():match("^%s*(.-)%s*$")
    for _, prefix in ipairs(opts.forward_prefixes) do
      if prefix ~= "" and subject:sub(1, #prefix) == prefix:lower() then
        milter.log.info("recipients: REJECT unedited forward:", subject)
        return refuse(opts.forward_reply)
      end
    end
  end,
}
