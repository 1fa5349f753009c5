% rebase('base.tpl', title='Hub', refresh_s=30)
<h1>Hub</h1>
<div class="columns">
<section>
<dl class="facts">
<dt>version</dt><dd>{{version}}</dd>
<dt>up since</dt><dd>{{model.fmt_time(started_ns)}}</dd>
<dt>ingest</dt><dd>{{'{:,.0f}'.format(ingest_eps)}} events/s (last minute)</dd>
<dt>events stored</dt><dd>{{'{:,}'.format(events_stored)}}</dd>
<dt>store size</dt><dd>{{'{:,.1f}'.format(store_bytes / 2**20)}} MiB</dd>
<dt>agents</dt><dd>{{agents}}</dd>
<dt>open streams</dt><dd>{{streams}}</dd>
<dt>events in flight</dt><dd>{{inflight}}</dd>
<dt>retries</dt><dd>{{retries}}</dd>
<dt>chain breaks</dt><dd>{{chain_breaks}}</dd>
</dl>
</section>
<section>
<h2>Ingest rate</h2>
{{!svg.line_chart(ingest_history, 'ingest events per second', 'events/s')}}
<h2>Rejected envelopes by reason</h2>
% if rejected:
<table><thead><tr><th>reason</th><th>count</th></tr></thead><tbody>
% for reason, count in rejected.items():
<tr><td>{{reason}}</td><td class="num">{{count}}</td></tr>
% end
</tbody></table>
% else:
<p class="empty">None.</p>
% end
</section>
</div>
<h2>Fleet certificates, soonest expiry first</h2>
<table>
<thead><tr><th>agent</th><th>host</th><th>valid until (UTC)</th><th>days left</th></tr></thead>
<tbody>
% for c in certificates:
<tr class="{{'row-down' if c['days_left'] is not None and c['days_left'] < 7 else 'row-late' if c['days_left'] is not None and c['days_left'] < 30 else ''}}">
<td>{{c['agent_id']}}</td><td>{{c['host']}}</td><td>{{c['not_after']}}</td><td class="num">{{'' if c['days_left'] is None else c['days_left']}}</td>
</tr>
% end
</tbody>
</table>
