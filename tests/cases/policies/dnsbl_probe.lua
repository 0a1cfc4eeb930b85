-- For tests/cases/dnsbl.toml: shows what the dnsbl policy published in ctx.msg as headers.
return {
  description = "report ctx.msg.dnswl and ctx.msg.dnsbl as X-Probe-* headers",
  eom = function(ctx)
    local wl = ctx.msg.dnswl
    if wl then ctx:add_header("X-Probe-DNSWL", wl.zone .. " " .. table.concat(wl.codes, ",")) end
    if ctx.msg.dnsbl then
      local hits = {}
      for _, hit in ipairs(ctx.msg.dnsbl) do
        hits[#hits + 1] = ("%s %s %s %s %s"):format(hit.list, hit.zone, hit.what, hit.name, hit.action)
      end
      ctx:add_header("X-Probe-DNSBL", #hits .. ": " .. table.concat(hits, "; "))
    end
  end,
}
