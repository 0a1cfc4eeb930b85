-- Test fixture: puts the entries of its options into the store's whitelist and blacklist
-- without expiry, as `luamilter db whitelist|blacklist add` does, at every connection.
local store = require "milter.store"

return {
  description = "seed the whitelist and blacklist for case files",
  options = { whitelist = {}, blacklist = {} },
  connect = function(ctx, hostname, ip, opts)
    for _, list in ipairs{ "whitelist", "blacklist" } do
      for _, entry in ipairs(opts[list]) do
        assert(store.list_add(list, entry, "seeded by the case file"))
      end
    end
  end,
}
