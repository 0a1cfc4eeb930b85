-- routing: wiretap, discard and smart aliases (stock pack; the classic milter's [wiretap] and
-- [smart_alias], §2.17). Everything happens at end of message, on the envelope:
-- * smart aliases: a recipient listed with the message's sender is replaced by the alias's
--   destinations;
-- * wiretap: mail from (and, with tap_recipients, to) a tapped user also goes to `dest`
--   (smart aliases apply to it); blind = false adds a `Cc: <dest>` header as well;
-- * discard: mail from a listed sender loses every original recipient, silently; recipients
--   added here (wiretap, aliases) are kept, so discard + wiretap intercepts;
-- * hide_path: mail to a listed recipient domain loses its Received headers (the classic
--   [scrub] hide_path), so the recipient does not see the internal path.
-- The sender is ctx.msg.original_sender when an earlier policy published one (the SRS-reversed
-- address of a forwarded bounce), else the envelope sender.
local milter = require "milter"
local site = require "milter.site"

-- List files, read once per Lua state (a reload reads them again): path → entries.
local files = {}

local function file_entries(path)
  local entries = files[path]
  if entries then return entries end
  local err
  entries, err = site.read_list(path)
  if not entries then
    milter.log.error("routing: cannot read address list", path, err)
    entries = {}
  end
  files[path] = entries
  return entries
end

-- The matching form of an address: the domain lowercased, the local part too unless
-- case_sensitive_localpart.
local function key(address, opts)
  address = address:gsub("^<(.*)>$", "%1")
  local localpart, domain = address:match("^(.*)@([^@]*)$")
  if not localpart then return opts.case_sensitive_localpart and address or address:lower() end
  if not opts.case_sensitive_localpart then localpart = localpart:lower() end
  return localpart .. "@" .. domain:lower()
end

-- Whether `address` is one of `entries` ("user@domain", or "@domain" for a whole domain).
local function listed(address, entries, opts)
  if address == nil or address == "" then return false end
  local k = key(address, opts)
  local domain = k:match("(@[^@]*)$")
  for _, entry in ipairs(entries) do
    local e = key(entry, opts)
    if e == k or (e:sub(1, 1) == "@" and e == domain) then return true end
  end
  return false
end

local function in_lists(address, list, paths, opts)
  if listed(address, list, opts) then return true end
  for _, path in ipairs(paths) do
    if listed(address, file_entries(path), opts) then return true end
  end
  return false
end

-- The destinations of the smart alias for (sender, rcpt), or nil.
local function alias(sender, rcpt, opts)
  for _, a in ipairs(opts.smart_alias) do
    if listed(sender, { a.sender }, opts) and key(a.recipient, opts) == key(rcpt, opts) then
      local dest = a.dest
      if type(dest) == "string" then dest = { dest } end
      return dest
    end
  end
  return nil
end

local function bracket(address)
  return address:find("^<") and address or "<" .. address .. ">"
end
-- Whether a recipient's domain is one of hide_path.
local function hides_path(ctx, opts)
  for _, rcpt in ipairs(ctx.recipients) do
    local domain = rcpt:match("@([^@>]+)>?$")
    if domain then
      domain = domain:lower()
      for _, d in ipairs(opts.hide_path) do
        if d:lower() == domain then return true end
      end
    end
  end
  return false
end

return {
  description = "wiretap, discard and smart aliases: envelope recipient rewriting at end of message",
  options = {
    wiretap_users = {},          -- "user@domain" or "@domain"
    wiretap_files = {},
    tap_recipients = true,       -- also tap mail *to* a tapped user (the classic tapped senders only)
    dest = "",                   -- where tapped mail also goes; "" = no wiretap
    blind = true,                -- false: add "Cc: <dest>" for each added tap recipient
    discard = {},                -- senders whose original recipients are dropped
    discard_files = {},
    smart_alias = {},            -- { sender = "a@x" or "@x", recipient = "r@y", dest = { "d@z", ... } }
    case_sensitive_localpart = false,
    hide_path = {},              -- recipient domains for which every Received header is removed
  },

  eom = function(ctx, opts)
    local sender = ctx.msg.original_sender or ctx.sender
    local deleted = {}
    for _, rcpt in ipairs(ctx.recipients) do
      local dest = alias(sender, rcpt, opts)
      if dest then
        ctx:delete_rcpt(bracket(rcpt))
        deleted[rcpt] = true
        for _, d in ipairs(dest) do ctx:add_rcpt(bracket(d)) end
        milter.log.debug("smart alias", sender, rcpt, "->", table.concat(dest, ", "))
      end
    end

    if opts.dest ~= "" then
      local tapped = in_lists(sender, opts.wiretap_users, opts.wiretap_files, opts)
      if not tapped and opts.tap_recipients then
        for _, rcpt in ipairs(ctx.recipients) do
          if in_lists(rcpt, opts.wiretap_users, opts.wiretap_files, opts) then
            tapped = true
            break
          end
        end
      end
      if tapped then
        for _, d in ipairs(alias(sender, opts.dest, opts) or { opts.dest }) do
          ctx:add_rcpt(bracket(d))
          if not opts.blind then ctx:add_header("Cc", bracket(d)) end
        end
        milter.log.debug("wiretap", sender, "->", opts.dest)
      end
    end

    if hides_path(ctx, opts) then
      local received = 0
      for _, h in ipairs(ctx.headers) do
        if h.name:lower() == "received" then received = received + 1 end
      end
      for i = received, 1, -1 do ctx:change_header("Received", i, nil) end
      milter.log.debug("hide_path: Received headers removed", received)
    end

    if in_lists(sender, opts.discard, opts.discard_files, opts) then
      for _, rcpt in ipairs(ctx.recipients) do
        if not deleted[rcpt] then ctx:delete_rcpt(bracket(rcpt)) end
      end
      milter.log.debug("discard: recipients dropped", sender, table.concat(ctx.recipients, ", "))
    end
  end,
}
