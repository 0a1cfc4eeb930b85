-- defang: attachments with a banned file extension are replaced by a text notice, HTML scripts
-- are cut out (stock pack; the classic milter's [defang], §2.18). The extension is looked for
-- in every Content-Type parameter and the Content-Disposition file name, in the member names
-- of ZIP attachments (a corrupt ZIP counts as bad) and inside attached messages. The new body
-- goes to the MTA with ctx:replace_body; the parts that are not bad stay byte for byte.
-- reject_virus_from: a sender of those domains gets a refusal instead (your own outgoing mail).
-- A message that cannot be read: a MIME boundary error is refused from external clients and
-- accepted from internal ones; a header parse error is refused.
-- With keep_copies, the original of a changed message ("defang") and a message that cannot be
-- read ("fail") are kept in the [site] save_dir Maildir (milter.archive.keep).
local milter = require "milter"
local archive = require "milter.archive"
local mime = require "milter.mime"
local net = require "milter.net"
local message = require "lib.message"

local function refuse(code, xcode, text)
  return milter.reject{ code = code, xcode = xcode, text = text }
end

-- Keeps `text` as a copy of `kind` when asked to; a save_dir that is not set is not an error.
local function keep(kind, text, opts)
  if not opts.keep_copies then return end
  local kept, err = archive.keep(kind, text)
  if not kept and err ~= "off" then milter.log.warn("defang: copy not kept:", err) end
end

local function listed(domain, domains)
  if not domain then return false end
  domain = domain:lower()
  for _, d in ipairs(domains) do
    if d:lower() == domain then return true end
  end
  return false
end

-- Sets, or deletes (value nil), the top-level header `name`.
local function set_header(ctx, name, value)
  if ctx:header(name) then
    ctx:change_header(name, 1, value)
  elseif value then
    ctx:add_header(name, value)
  end
end

return {
  description = "replace attachments with banned extensions by a notice, cut HTML scripts",
  noreply = { "body" },
  options = {
    banned_exts = mime.default_banned_exts(),
    scan_rfc822 = true,
    scan_zip = true,
    scan_html = true,
    notice = "This message appeared to contain a virus.\n"
      .. "It was originally named '{name}', and has been removed.\n"
      .. "See your administrator.\n",
    reject_virus_from = {},
    virus_reply = { "Attachment type not allowed.",
      "You attempted to send an attachment with a banned extension." },
    boundary_reply = "Boundary error in your message, are you a spammer?",
    header_reply = "Header parse error in your message, are you a spammer?",
    max_size = 10 * 1024 * 1024,
    keep_copies = true,
  },

  body = function(ctx, chunk, opts) message.collect(ctx, chunk, "defang", opts.max_size) end,

  eom = function(ctx, opts)
    local text = message.text_for(ctx, "defang")
    if not text then return end
    local result, err, detail = mime.defang(text, {
      banned_exts = opts.banned_exts,
      scan_rfc822 = opts.scan_rfc822,
      scan_zip = opts.scan_zip,
      scan_html = opts.scan_html,
      notice = opts.notice:gsub("\r?\n", "\r\n"),
    })
    if err then keep("fail", text, opts) end
    if err == "boundary" then
      milter.log.debug("defang: MIME boundary error", detail)
      if ctx.client.internal then return end
      return refuse(554, "5.7.7", opts.boundary_reply)
    elseif err then
      milter.log.debug("defang: header parse error", detail)
      return refuse(554, "5.7.7", opts.header_reply)
    end
    if not result then return end
    if #result.removed > 0 then
      local _, domain = net.split(ctx.sender or "")
      if listed(domain, opts.reject_virus_from) then
        milter.log.debug("defang: banned attachment from", ctx.sender, table.concat(result.removed, ", "))
        return refuse(550, "5.7.1", opts.virus_reply)
      end
    end
    keep("defang", text, opts)
    for _, h in ipairs(result.headers) do set_header(ctx, h.name, h.value) end
    ctx:replace_body(result.body)
    ctx.msg.defanged = result.removed
    milter.log.debug("defanged", table.concat(result.removed, ", "), "scripts cut:", result.scripts)
  end,
}
