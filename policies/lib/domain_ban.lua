-- lib/domain_ban: ban the sender domain of a message (the classic milter's "bandomain").
--
-- Shared by stock policies that ban domains (keywords, bans); site policies may use it too:
--   local domain_ban = require "lib.domain_ban"
-- Documented in docs/policies/lib/domain_ban.md.
local store = require "milter.store"
local net = require "milter.net"

local M = {}

-- Mail providers whose domains are never banned: their users' mailboxes are blacklisted
-- instead. A copy of the classic milter's built-in list; policies offer it as an option.
M.email_providers = {
  "yahoo.com", "gmail.com", "aol.com", "hotmail.com", "me.com", "googlegroups.com", "att.net",
  "nokiamail.com",
}

-- The ban entry for `domain`: a generic host label (mail12., smtp3., mx1.: 1-3 digits) bans
-- every sibling, "*.<rest>", as long as <rest> still has two labels; any other domain is banned
-- exactly.
function M.entry(domain)
  domain = domain:lower()
  for _, label in ipairs{ "mail", "smtp", "mx" } do
    local rest = domain:match("^" .. label .. "%d%d?%d?%.(.+)$")
    if rest and rest:find(".", 1, true) then return "*." .. rest end
  end
  return domain
end

-- Whether `domain` is one of `providers` or a subdomain of one.
function M.provider(domain, providers)
  domain = domain:lower()
  for _, p in ipairs(providers) do
    p = p:lower()
    if domain == p or domain:sub(-(#p + 1)) == "." .. p then return true end
  end
  return false
end

-- The sender of the message when its domain is identified, that is when SPF passed
-- (ctx.msg.spf, published by the spf policy): the domain and the mailbox. nil otherwise.
function M.identified(ctx)
  local spf = ctx.msg.spf
  if type(spf) ~= "table" or (spf.effective or spf.official) ~= "pass" then return nil end
  local sender = ctx.sender or ""
  local _, domain = net.split(sender)
  domain = spf.domain or domain
  if not domain or domain == "" then return nil end
  if sender == "" then sender = "postmaster@" .. domain end
  return domain:lower(), sender:lower()
end

-- Bans the identified sender of the message in the store.
--   opts.email_providers  list of provider domains (default M.email_providers)
--   opts.ttl              domain ban lifetime in seconds; nil or 0: permanent
--   opts.blacklist_ttl    provider mailbox blacklisting lifetime; nil or 0: permanent
-- Returns what it did:
--   "domain", entry      the domain was banned as `entry` (or a ban already covered it)
--   "mailbox", address   a provider's mailbox was blacklisted
--   nil, "unidentified"  SPF did not pass: nothing to ban
--   nil, err             the store failed ("unavailable", "timeout", ...)
function M.ban(ctx, reason, opts)
  opts = opts or {}
  local domain, mailbox = M.identified(ctx)
  if not domain then return nil, "unidentified" end
  local function ttl(seconds)
    if seconds and seconds > 0 then return seconds end
    return nil
  end
  if M.provider(domain, opts.email_providers or M.email_providers) then
    local ok, err = store.list_add("blacklist", mailbox, reason, ttl(opts.blacklist_ttl))
    if not ok then return nil, err end
    return "mailbox", mailbox
  end
  local existing, err = store.banned("domain", domain)
  if existing == nil then return nil, err end
  if existing then return "domain", existing.entry end
  local entry = M.entry(domain)
  local ok, ban_err = store.ban("domain", entry, reason, ttl(opts.ttl))
  if not ok then return nil, ban_err end
  return "domain", entry
end

return M
