% rebase('base.tpl', title=title)
<h1>{{status}}</h1>
<p class="error">{{message}}</p>
<p><a href="/">Back to the fleet</a></p>
