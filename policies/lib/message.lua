-- lib/message: the whole message as the MTA sent it, for policies that read or keep it
-- (defang, archive). Each such policy has a body handler that calls message.collect; the chunks
-- are kept once per message in ctx.msg, however many policies collect them.
--   local message = require "lib.message"
--   body = function(ctx, chunk) message.collect(ctx, chunk, "mypolicy") end,
--   eom  = function(ctx) local text = message.text(ctx) ... end,
-- Documented in docs/policies/lib/message.md.
local M = {}

local KEY = "lib.message"

-- Keeps `chunk` of the body. `who` names the calling policy: the first policy that collects
-- for a message keeps the chunks, the others' calls are no-ops.
function M.collect(ctx, chunk, who)
  local state = ctx.msg[KEY]
  if not state then
    state = { owner = who, chunks = {} }
    ctx.msg[KEY] = state
  end
  if state.owner == who then state.chunks[#state.chunks + 1] = chunk end
end

-- The body collected so far (CRLF line ends, as the MTA sent it); "" when none was.
function M.body(ctx)
  local state = ctx.msg[KEY]
  return state and table.concat(state.chunks) or ""
end

-- The header block: one `Name: value` line per header, CRLF line ends, blank line included.
function M.header_block(ctx)
  local lines = {}
  for i, h in ipairs(ctx.headers) do
    local value = h.value:gsub("\r?\n", "\r\n")
    lines[i] = h.name .. ": " .. value .. "\r\n"
  end
  lines[#lines + 1] = "\r\n"
  return table.concat(lines)
end

-- The whole message: header block and body.
function M.text(ctx)
  return M.header_block(ctx) .. M.body(ctx)
end

return M
