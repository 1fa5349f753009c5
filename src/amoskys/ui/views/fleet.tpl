% rebase('base.tpl', title='Fleet', refresh_s=30)
<h1>Fleet</h1>
<p class="totals">
<span class="badge up">{{agents['up']}} up</span>
<span class="badge late">{{agents['late']}} late</span>
<span class="badge down">{{agents['down']}} down</span>
<span>{{len(hosts)}} hosts · agents judged against their heartbeat interval (late after {{model.LATE_FACTOR}} missed, down after {{2 * model.LATE_FACTOR}})</span>
</p>
% if not hosts:
<p class="empty">No agent has reported to the hub yet.</p>
% else:
<table class="fleet">
<thead><tr><th>host</th><th>state</th><th>agents</th><th>last heartbeat</th><th>events/s</th><th>events</th><th>alerts</th></tr></thead>
<tbody>
% for h in hosts:
<tr class="row-{{h['state']}}">
<td><a href="{{h['host_url']}}">{{h['host']}}</a></td>
<td><span class="badge {{h['state']}}">{{h['state']}}</span></td>
<td>
% for a in h['agents']:
<span class="chip {{a['state']}}" title="{{a['agent_id']}}: heartbeat {{a['heard_ago']}} ago, every {{a['heartbeat_interval_s'] or '?'}} s">{{a['kind'] or a['agent_id']}} {{a['state']}}</span>
% end
</td>
<td class="nowrap">{{model.ago((now_ns - h['last_heartbeat_ns']) / 1e9)}} ago</td>
<td class="nowrap">{{!rates.chart(h['host'])}} {{'%.1f' % h['rate_eps'] if h['rate_eps'] is not None else ''}}</td>
<td class="num">{{'{:,}'.format(h['events_total'])}}</td>
<td class="num{{' alert' if h['alerts_total'] else ''}}">{{h['alerts_total']}}</td>
</tr>
% end
</tbody>
</table>
% end
