-- hygiene.lua: a small realistic policy.
--  * refuses a bare IP address as HELO name (bracketed literals are fine),
--  * refuses senders on a block list, with a multi-line reply,
--  * refuses recipients at domains the site does not receive for, one by one,
--  * holds messages whose Subject carries a quarantine keyword,
--  * stamps accepted mail with the number of recipients.
local milter = require "milter"

local function domain_of(address)
  return (address:match("@([^@]+)$") or ""):lower()
end

local function list_set(list)
  local set = {}
  for _, item in ipairs(list) do set[item:lower()] = true end
  return set
end

return {
  description = "HELO sanity, sender block list, local domains, quarantine keywords",
  options = {
    blocked_senders = { "spam@bad.example" },
    local_domains = { "example.org" },
    quarantine_words = { "URGENT WIRE TRANSFER" },
  },

  helo = function(ctx, name)
    if name:match("^%d+%.%d+%.%d+%.%d+$") then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "hello name cannot be numeric ip" }
    end
  end,

  mail = function(ctx, sender, args, opts)
    ctx.vars.blocked = ctx.vars.blocked or list_set(opts.blocked_senders)
    if ctx.vars.blocked[sender:lower()] then
      return milter.reject{
        code = 550, xcode = "5.7.1",
        text = { "Sender <" .. sender .. "> is blocked here.", "Contact postmaster if this is wrong." },
      }
    end
  end,

  rcpt = function(ctx, rcpt, args, opts)
    ctx.vars.domains = ctx.vars.domains or list_set(opts.local_domains)
    if not ctx.vars.domains[domain_of(rcpt)] then
      return milter.reject{ code = 550, xcode = "5.7.1", text = "Relaying denied for <" .. rcpt .. ">" }
    end
  end,

  eom = function(ctx, opts)
    local subject = ctx:header("Subject") or ""
    for _, word in ipairs(opts.quarantine_words) do
      if subject:upper():find(word:upper(), 1, true) then
        ctx:quarantine("subject contains " .. word)
      end
    end
    ctx:add_header("X-Hygiene", "recipients=" .. #ctx.recipients)
    return milter.continue()
  end,
}
