// Ask for the shipped Japanese font at once: a browser loads a web font only when text on the page needs it, and
// Chromium does not count the chat input's Japanese placeholder as such text (it would show boxes until a Japanese
// message appears). When it is in, a class on <html> restyles the placeholder so that it is drawn again with it.
document.fonts.load('16px "Noto Sans JP"', "メッセージを入力日本語").then(function () {
  document.documentElement.classList.add("ja-font");
});
