"""DNS enforcement: the embedded sinkhole (server, table, wire, forward, acl) and the RPZ primary (rpz)."""
