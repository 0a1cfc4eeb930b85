-- keywords: refuse messages whose Subject or From display name carries spam keywords (stock
-- pack).
--
-- At each header (external clients, messages not whitelisted): the Subject and the From display
-- name, with RFC 2047 encoded words decoded, are checked against the keyword lists. A hit in the
-- From name also bans the sender domain when SPF identified it (lib/domain_ban). Lists are
-- inline or "file:<path>" entries naming a file of keywords, one per line. Empty and
-- one-character keywords are ignored: they would match everything.
-- Also refused: a Message-ID shorter than min_message_id characters, and an X-Mailer that is
-- (lowercased) one of bulk_mailers or contains one of bulk_mailer_words.
local milter = require "milter"
local mime = require "milter.mime"
local site = require "milter.site"
local domain_ban = require "lib.domain_ban"

local function copy(list)
  local out = {}
  for i, v in ipairs(list) do out[i] = v end
  return out
end

-- The compiled keyword lists of each options table (one per Lua state and generation).
local compiled = setmetatable({}, { __mode = "k" })

local function words(opts, option, lower)
  local out = {}
  local function add(word)
    if (utf8.len(word) or #word) > 1 then
      out[#out + 1] = lower and word:lower() or word
    end
  end
  for _, item in ipairs(opts[option]) do
    local path = item:match("^file:(.+)$")
    if path then
      local list, err = site.read_list(path)
      if not list then
        error(("keywords: %s: cannot read %s (%s)"):format(option, path, err), 0)
      end
      for _, word in ipairs(list) do add(word) end
    else
      add(item)
    end
  end
  return out
end

local function lists(opts)
  local l = compiled[opts]
  if not l then
    l = {
      spam = words(opts, "spam_words", false),
      porn = words(opts, "porn_words", true),
      from = words(opts, "from_words", false),
      prefixes = words(opts, "adv_prefixes", true),
      suffixes = words(opts, "adv_suffixes", true),
    }
    compiled[opts] = l
  end
  return l
end

local function contains(text, list)
  for _, word in ipairs(list) do
    if text:find(word, 1, true) then return word end
  end
end

local function refuse(text)
  return milter.reject{ code = 550, xcode = "5.7.1", text = text }
end

local function check_subject(subject, l, opts)
  if contains(subject, l.spam) then return refuse(opts.subject_reply) end
  local lower = subject:lower():match("^%s*(.-)%s*$")
  for _, prefix in ipairs(l.prefixes) do
    if lower:sub(1, #prefix) == prefix then return refuse(opts.adv_reply) end
  end
  for _, suffix in ipairs(l.suffixes) do
    if lower:sub(-#suffix) == suffix then return refuse(opts.adv_reply) end
  end
  if contains(lower, l.porn) then return refuse(opts.subject_reply) end
end

-- The display names of a From value, decoded; what is left without <address> when the value
-- is not a valid address list.
local function display_names(value)
  local list = mime.addresses(value)
  if not list then return (mime.decode(value):gsub("<[^>]*>", "")) end
  local names = {}
  for _, m in ipairs(list) do names[#names + 1] = m.name end
  return table.concat(names, " ")
end

local function ban_sender(ctx, name, opts)
  if not opts.ban_domains then return end
  local kind, what = domain_ban.ban(ctx, "keywords: From " .. name, {
    email_providers = opts.email_providers,
    ttl = opts.ban_ttl,
    blacklist_ttl = opts.blacklist_ttl,
  })
  if kind == "domain" then
    milter.log.debug("keywords: banned domain", what)
  elseif kind == "mailbox" then
    milter.log.debug("keywords: blacklisted", what)
  elseif what ~= "unidentified" then
    milter.log.warn("keywords: cannot ban the sender:", what)
  end
end

local function check_from(ctx, value, l, opts)
  local name = display_names(value)
  if contains(name, l.spam) or contains(name, l.from) then
    ban_sender(ctx, name, opts)
    return refuse(opts.from_reply)
  end
  if contains(name:lower(), l.porn) then
    ban_sender(ctx, name, opts)
    return refuse(opts.language_reply)
  end
end

-- The answer to a Message-ID or X-Mailer header, or nil.
local function check_trace(lname, value, opts)
  local trimmed = value:match("^%s*(.-)%s*$")
  if lname == "message-id" then
    if #trimmed < opts.min_message_id then return refuse(opts.message_id_reply) end
    return nil
  end
  local mailer = mime.decode(trimmed):lower()
  for _, name in ipairs(opts.bulk_mailers) do
    if name ~= "" and mailer == name:lower() then return refuse(opts.bulk_mailer_reply) end
  end
  for _, word in ipairs(opts.bulk_mailer_words) do
    if word ~= "" and mailer:find(word:lower(), 1, true) then return refuse(opts.bulk_mailer_reply) end
  end
  return nil
end

return {
  description = "refuse spam keywords in the Subject and the From name, short Message-IDs, bulk mailers; ban the domains that send them",
  -- Headers stream to us without a round trip each; a refusal is answered at the end of the
  -- headers, which is the same moment for the SMTP client (after DATA).
  noreply = { "header" },
  options = {
    spam_words = {},
    porn_words = {},
    from_words = {},
    adv_prefixes = { "adv:", "adv.", "adv ", "<adv>", "<ad>", "[adv]", "(adv)", "advt:", "advert:", "[spam]" },
    adv_suffixes = { "adv", "(adv)", "[adv]", "(non-spam)" },
    subject_reply = "That subject is not allowed",
    adv_reply = "No soliciting allowed",
    from_reply = "No soliciting",
    language_reply = "Watch your language",
    ban_domains = true,
    ban_ttl = 0,
    blacklist_ttl = milter.duration "30d",
    email_providers = copy(domain_ban.email_providers),
    min_message_id = 4,
    message_id_reply = "Message-ID too short",
    bulk_mailers = { "direct email", "calypso", "mail bomber" },
    bulk_mailer_words = { "optin" },
    bulk_mailer_reply = "Bulk mailer not accepted",
  },

  header = function(ctx, name, value, opts)
    local lname = name:lower()
    if lname ~= "subject" and lname ~= "from" and lname ~= "message-id" and lname ~= "x-mailer" then
      return
    end
    if ctx.client.internal or ctx.msg.listed == "WHITELIST" then return end
    local verdict
    if lname == "message-id" or lname == "x-mailer" then
      verdict = check_trace(lname, value, opts)
      if verdict then milter.log.debug("keywords: REJECT", name .. ":", value) end
      return verdict
    end
    local l = lists(opts)
    if lname == "subject" then
      verdict = check_subject(mime.decode(value), l, opts)
    else
      verdict = check_from(ctx, value, l, opts)
    end
    if verdict then
      milter.log.debug("keywords: REJECT", name .. ":", mime.decode(value))
    end
    return verdict
  end,
}
