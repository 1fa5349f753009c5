% if not events:
<p class="empty">No events.</p>
% else:
<table class="events"{{!' id="events"' if get('live') else ''}}>
<thead><tr><th>time (UTC)</th><th>host</th><th>agent</th><th>kind</th><th>severity</th><th>what</th></tr></thead>
<tbody>
% for e in events:
<tr class="sev-{{e['severity']}}">
<td class="nowrap">{{e['time']}}</td>
<td><a href="{{e['host_url']}}">{{e['host']}}</a></td>
<td>{{e['agent_id']}}</td>
<td>{{e['kind']}}</td>
<td><span class="sev sev-{{e['severity']}}">{{e['severity']}}</span></td>
<td class="summary">{{e['summary']}}</td>
</tr>
% end
</tbody>
</table>
% end
