// Ask for the shipped Japanese font at once: a browser loads a web font only when text on the page needs it, and
// the chat input's Japanese placeholder alone did not make Chromium load it (it showed boxes until a Japanese
// message appeared). When it is in, a class on <html> restyles the placeholder so that it is drawn again with it.
document.fonts.load('16px "Noto Sans JP"', "メッセージを入力日本語").then(function () {
  document.documentElement.classList.add("ja-font");
});
