% rebase('base.tpl', title='Host', refresh_s=60)
<h1>Host {{host}}</h1>
<section>
<h2>Agents</h2>
% if agents:
<table>
<thead><tr><th>agent</th><th>kind</th><th>version</th><th>state</th><th>last heartbeat</th><th>events</th><th>alerts</th><th>certificate until</th></tr></thead>
<tbody>
% for a in agents:
<tr>
<td>{{a['agent_id']}}</td><td>{{a['kind']}}</td><td>{{a['version']}}</td>
<td><span class="badge {{a['state']}}">{{a['state']}}</span></td>
<td class="nowrap">{{model.fmt_time(a['last_heartbeat_ns'])}} ({{a['heard_ago']}} ago, every {{a['heartbeat_interval_s'] or '?'}} s)</td>
<td class="num">{{'{:,}'.format(a['events_total'])}}</td><td class="num">{{a['alerts_total']}}</td>
<td class="nowrap">{{model.fmt_time(a['cert_not_after_ns'])}}</td>
</tr>
% end
</tbody>
</table>
% else:
<p class="empty">No agent registered for this host.</p>
% end
</section>
<div class="columns">
<section>
<h2>Last host metrics</h2>
% if metrics:
<dl class="facts">
<dt>at</dt><dd>{{metrics['time']}}</dd>
<dt>CPU</dt><dd>{{'%.0f' % metrics['cpu_percent']}} %</dd>
<dt>load</dt><dd>{{' / '.join('%.2f' % x for x in metrics['load'])}}</dd>
<dt>memory available</dt><dd>{{'{:,.0f}'.format(metrics['mem_available_bytes'] / 2**20)}} of {{'{:,.0f}'.format(metrics['mem_total_bytes'] / 2**20)}} MiB</dd>
<dt>uptime</dt><dd>{{metrics['uptime']}}</dd>
<dt>users</dt><dd>{{', '.join(metrics['users']) or 'none'}}</dd>
% for d in metrics['disks']:
<dt>disk {{d['mount']}}</dt><dd>{{'%.0f' % (100 * d['used_bytes'] / (d['total_bytes'] or 1))}} % used of {{'{:,.1f}'.format(d['total_bytes'] / 2**30)}} GiB</dd>
% end
</dl>
% else:
<p class="empty">No host_metrics event from this host.</p>
% end
</section>
<section>
<h2>Listening ports</h2>
% if metrics and metrics['listening']:
<table>
<thead><tr><th>port</th><th>protocol</th><th>address</th><th>process</th></tr></thead>
<tbody>
% for s in metrics['listening']:
<tr><td class="num">{{s['port']}}</td><td>{{s['protocol']}}</td><td>{{s['address']}}</td><td title="{{s['owner_why']}}">{{s['owner']}}</td></tr>
% end
</tbody>
</table>
% else:
<p class="empty">None reported.</p>
% end
</section>
</div>
<section>
<h2>Devices its scanner sees</h2>
% if devices:
<table>
<thead><tr><th>MAC</th><th>addresses</th><th>vendor</th><th>interface</th><th>last change</th></tr></thead>
<tbody>
% for d in devices:
<tr><td>{{d['mac']}}</td><td>{{', '.join(d['ips'])}}</td><td>{{d['vendor']}}</td><td>{{d['interface']}}</td><td>{{d['last_change']}} {{d['time']}}</td></tr>
% end
</tbody>
</table>
% else:
<p class="empty">No device events from this host.</p>
% end
</section>
<section>
<h2>Recent events</h2>
% include('events_table.tpl', events=events)
<p><a href="{{events_url}}">Search this host's events</a></p>
</section>
